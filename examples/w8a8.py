"""W8A8 inference of the float model trained by qat.py (int8 and float8 e4m3), against the float model.

    python examples/w8a8.py [--steps 600] [--time]

Weights are quantized once per output channel with bj.quantize_weight (stored [N, K], as the GEMM
reads them); each layer is bj.w8a8_matmul: the activations quantized per token at run time, then the
scaled product (scales in its epilogue). With --time and a GPU, it also times a stack of pre-norm W8A8
layers (bj.rms_norm_w8a8_matmul: residual add, RMSNorm, dynamic quantize and the product) against the
same stack in bf16, and the stack with blockwise float8 scales (quantize_per_token_group, 128 x 128
weight blocks).
"""

import argparse

import jax
import jax.numpy as jnp
import qat
from lm import device_seconds  # the sibling example's device timer

import baracuda_jax as bj


def w8a8_linear(h, w, b):
    """h @ w + b with w a bj.QuantizedWeight: h quantized per token in w's format."""
    return bj.w8a8_matmul(h, w) + b


def w8a8_forward(qparams, x):
    h = x
    for i, (w, b) in enumerate(qparams):
        h = w8a8_linear(h, w, b)
        if i < len(qparams) - 1:
            h = jax.nn.relu(h)
    return h


def rms_norm(x, w, eps=1e-6):
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps) * w.astype(jnp.float32)).astype(x.dtype)


def bf16_stack(x, norms, weights):
    """Pre-norm layers in bf16: x + rms_norm(x) @ w, weights [K, N]."""
    for g, w in zip(norms, weights):
        x = x + rms_norm(x, g) @ w
    return x


def w8a8_stack(x, norms, qweights):
    """The same layers in W8A8, written as a residual stream: layer i's op adds the last product y to
    the stream r (r = x_i = x_{i-1} + y, bf16_stack's add, rounded to x's dtype as there), normalizes,
    quantizes per token and runs the product, so no separate add runs between the layers; the last product
    joins the stream at the end."""
    (g, w), *rest = zip(norms, qweights)
    y, r = bj.rms_norm_w8a8_matmul(x, g, w)  # r = x
    for g, w in rest:
        y, r = bj.rms_norm_w8a8_matmul(y, g, w, residual=r)
    return r + y


def w8a8_block_stack(x, norms, qweights):
    """The same layers with DeepSeek-V3's FP8 scales: the normed activations quantized per 1 x 128
    group, the weights per 128 x 128 block, the skip connection in the matmul's epilogue."""
    for g, w in zip(norms, qweights):
        q, s = bj.quantize_per_token_group(rms_norm(x, g), 128)
        x = bj.scaled_matmul(q, s, w, out_dtype=x.dtype, residual=x)
    return x


def time_stack(tokens, d=4096, layers=8, reps=30):
    """Device µs per call of an 8-layer stack, bf16 and W8A8 (int8, float8, float8 blockwise)."""
    key = jax.random.key(0)
    x = jax.random.normal(key, (tokens, d), jnp.bfloat16)
    norms = [jnp.ones((d,), jnp.bfloat16) for _ in range(layers)]
    weights = [(jax.random.normal(jax.random.fold_in(key, i), (d, d), jnp.float32) / 64) for i in range(layers)]
    times = {"bf16": device_seconds(bf16_stack, (x, norms, [w.astype(jnp.bfloat16) for w in weights]), reps)}
    for dtype in (jnp.int8, jnp.float8_e4m3fn):
        qweights = [bj.quantize_weight(w, dtype=dtype) for w in weights]
        times[jnp.dtype(dtype).name] = device_seconds(w8a8_stack, (x, norms, qweights), reps)
    block_weights = [bj.quantize_weight(w, block_size=128) for w in weights]
    times["float8 blockwise"] = device_seconds(w8a8_block_stack, (x, norms, block_weights), reps)
    return {name: t * 1e6 for name, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--time", action="store_true", help="time a W8A8 layer stack at LLM sizes (meant for a GPU)")
    args = p.parse_args(argv)
    x_tr, x_te, y_tr, y_te = data = qat.load()
    params, _, float_acc = qat.train("float", args.steps, data=data)
    accuracy = {"float": float_acc}
    for dtype in (jnp.int8, jnp.float8_e4m3fn):
        # float32: the W8A8 ops take 16- and 32-bit floats, and qat's are float64 under jax_enable_x64
        qparams = [
            (bj.quantize_weight(w.astype(jnp.float32), dtype=dtype), b.astype(jnp.float32))
            for w, b in zip(params["w"], params["b"])
        ]
        accuracy[jnp.dtype(dtype).name] = qat.accuracy(lambda x: w8a8_forward(qparams, x), x_te, y_te)
    print("digits test accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items()))
    if args.time:
        names = ("int8", "float8_e4m3fn", "float8 blockwise")
        print(
            f"{'tokens':>7} {'bf16 us':>9} {'int8 us':>9} {'fp8 us':>9} {'fp8 blk us':>11}"
            f"  (8 layers, D 4096, {jax.devices()[0].device_kind}; speed-ups over bf16)"
        )
        for tokens in (16, 256, 1024, 4096):
            t = time_stack(tokens)
            print(
                f"{tokens:>7} {t['bf16']:>9.1f} "
                + " ".join(f"{t[n]:>9.1f}" for n in names)
                + "  ("
                + ", ".join(f"{t['bf16'] / t[n]:.2f}x" for n in names)
                + ")"
            )
    return accuracy


if __name__ == "__main__":
    main()
