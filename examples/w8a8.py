"""W8A8 int8 inference of the float model trained by qat.py, against the float model.

    python examples/w8a8.py [--steps 600] [--time]

Weights are quantized per output channel (quantize_per_token on W^T: one row per channel),
activations per token with quantize_per_token_dynamic; the matmul is int8 x int8 -> int32
(lax.dot_general with preferred_element_type=int32), then a dequantize epilogue. With --time
and a GPU, it also times a W8A8 linear layer at LLM sizes against a bf16 one.
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
from jax import lax

import baracuda_jax as bj
import qat


def quantize_weights(w):
    """Per output channel: w [in, out] -> (int8 [out, in], scale [out])."""
    wt = w.T
    scale = jnp.max(jnp.abs(wt), axis=-1) * (1 / 127)
    return bj.quantize_per_token(wt, scale), scale


def w8a8_linear(h, wq, w_scale, b):
    q, s, _ = bj.quantize_per_token_dynamic(h)  # symmetric: the zero point is 0
    acc = lax.dot_general(q, wq, (((q.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * s[..., None] * w_scale).astype(h.dtype) + b


def w8a8_forward(qparams, x):
    h = x
    for i, (wq, ws, b) in enumerate(qparams):
        h = w8a8_linear(h, wq, ws, b)
        if i < len(qparams) - 1:
            h = jax.nn.relu(h)
    return h


def time_linear(tokens, d_in=4096, d_out=4096, reps=50):
    """Device µs per call of one W8A8 linear, a bf16 one, and the activation quantization alone."""
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
    from timing import time_per_call  # the benchmarks' method: kernel durations from a profiler trace

    k1, k2 = jax.random.split(jax.random.key(0))
    h = jax.random.normal(k1, (tokens, d_in), jnp.bfloat16)
    w = jax.random.normal(k2, (d_in, d_out), jnp.bfloat16) / 64
    wq, ws = quantize_weights(w.astype(jnp.float32))
    fns = {"bf16": lambda h: h @ w, "w8a8": lambda h: w8a8_linear(h, wq, ws, 0),
           "quantize only": lambda h: bj.quantize_per_token_dynamic(h)[0]}
    return {name: time_per_call(f, [(h,)], reps) * 1e6 for name, f in fns.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--time", action="store_true", help="time a W8A8 linear at LLM sizes (meant for a GPU)")
    args = p.parse_args(argv)
    x_tr, x_te, y_tr, y_te = data = qat.load()
    params, _, float_acc = qat.train("float", args.steps, data=data)
    qparams = [(*quantize_weights(w), b) for w, b in zip(params["w"], params["b"])]
    int8_acc = qat.accuracy(lambda x: w8a8_forward(qparams, x), x_te, y_te)
    print(f"digits test accuracy: float {float_acc:.4f}, W8A8 int8 {int8_acc:.4f}")
    if args.time:
        print(f"{'tokens':>7} {'bf16 us':>9} {'w8a8 us':>9} {'quantize us':>12}  (4096 -> 4096, {jax.devices()[0].device_kind})")
        for tokens in (16, 256, 1024, 4096):
            t = time_linear(tokens)
            print(f"{tokens:>7} {t['bf16']:>9.1f} {t['w8a8']:>9.1f} {t['quantize only']:>12.1f}")
    return float_acc, int8_acc


if __name__ == "__main__":
    main()
