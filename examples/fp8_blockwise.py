"""DeepSeek-V3-style FP8 on the digits MLP: train with 1 x 128 group fake-quant, serve with the blockwise
scaled matmul.

    python examples/fp8_blockwise.py [--steps 600]

The two hidden 256 x 256 layers run in float8 e4m3 (the first and last layers, 64 -> 256 and
256 -> 10, stay in float, as DeepSeek keeps its embedding and output head):
- activations: one scale per 1 x 128 group of each token (`quantize_per_token_group`);
- weights: one scale per 128 x 128 block, quantized once and stored [N, K];
- the matmul: `scaled_matmul` with a_scale [..., K // 128] and b_scale [K // 128, N // 128]
  (cuBLASLt's blockwise modes on a GPU).

Trained three ways, the same steps and seed: float; QAT, whose forward pass fake-quantizes those
layers' activations (`fake_quantize_per_token_group`, straight-through gradient) and weights (per
block, straight-through in jnp); and the float model quantized after training (PTQ). Each is
evaluated through the blockwise FP8 inference path.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import qat

import baracuda_jax as bj

SIZES = (64, 256, 256, 256, 10)
FP8 = (1, 2)  # the layers that run in float8: K and N multiples of 128
BLOCK = 128
FMAX = 448.0


def init(key):
    keys = jax.random.split(key, len(SIZES) - 1)
    return {
        "w": [jax.random.normal(k, (i, o)) * np.sqrt(2 / i) for k, i, o in zip(keys, SIZES, SIZES[1:])],
        "b": [jnp.zeros(o) for o in SIZES[1:]],
    }


def block_scales(w):
    """One scale per 128 x 128 block of w [K, N]: amax / fmax, as [K // 128, N // 128]."""
    k, n = w.shape
    return jnp.max(jnp.abs(w.reshape(k // BLOCK, BLOCK, n // BLOCK, BLOCK)), axis=(1, 3)) * (1 / FMAX)


def quantize_weight(w):
    """w [K, N] -> (q stored [N, K] in e4m3, scale [K // 128, N // 128])."""
    s = block_scales(w)
    full = jnp.repeat(jnp.repeat(s, BLOCK, 0), BLOCK, 1)
    return (w / full).astype(jnp.float8_e4m3fn).T, s


def fake_quantize_weight(w):
    """The weight's round trip through e4m3 blocks, with a straight-through gradient."""
    q, s = quantize_weight(w)
    back = q.T.astype(jnp.float32) * jnp.repeat(jnp.repeat(s, BLOCK, 0), BLOCK, 1)
    return w + jax.lax.stop_gradient(back - w)


def forward(params, x, qat_mode):
    h = x
    for i, (w, b) in enumerate(zip(params["w"], params["b"])):
        if qat_mode and i in FP8:
            h, w = bj.fake_quantize_per_token_group(h, BLOCK), fake_quantize_weight(w)
        h = h @ w + b
        if i < len(SIZES) - 2:
            h = jax.nn.relu(h)
    return h


def fp8_forward(params, x):
    """Inference with the FP8 layers through quantize_per_token_group and the blockwise matmul."""
    h = x
    for i, (w, b) in enumerate(zip(params["w"], params["b"])):
        if i in FP8:
            q, s = bj.quantize_per_token_group(h, BLOCK)
            wq, ws = quantize_weight(w)
            h = bj.scaled_matmul(q, s, wq.T, ws, out_dtype=jnp.float32) + b
        else:
            h = h @ w + b
        if i < len(SIZES) - 2:
            h = jax.nn.relu(h)
    return h


def train(qat_mode, steps, data, seed=0):
    x_tr, _, y_tr, _ = data
    loss_fn = lambda params, x, y: qat.cross_entropy(forward(params, x, qat_mode), y)
    return qat.fit(loss_fn, init(jax.random.key(seed)), x_tr, y_tr, steps, seed=seed)[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    args = p.parse_args(argv)
    data = qat.load()
    _, x_te, _, y_te = data
    float_params = train(False, args.steps, data)
    qat_params = train(True, args.steps, data)
    results = {
        "float": qat.accuracy(lambda x: forward(float_params, x, False), x_te, y_te),
        "PTQ fp8 blockwise": qat.accuracy(lambda x: fp8_forward(float_params, x), x_te, y_te),
        "QAT fp8 blockwise": qat.accuracy(lambda x: fp8_forward(qat_params, x), x_te, y_te),
    }
    print(f"digits, {args.steps} steps of 128, test accuracy ({jax.devices()[0].device_kind}):")
    for name, acc in results.items():
        print(f"  {name:<18} {acc:.4f}")
    return results


if __name__ == "__main__":
    main()
