"""Quantization-aware training with the fused ops: a small pre-norm SwiGLU network on scikit-learn's digits.

    python examples/qat_ffn.py [--steps 600]

Each block is `h + FFN(RMSNorm(h))`, FFN = `(silu(n @ w1) * (n @ w3)) @ w2`. In float it is written in
jnp; with QAT the norm and its quantizer are one op (`rms_norm_fake_quantize_per_token`) and so are the
gated activation and the quantizer before the down projection (`silu_mul_fake_quantize_per_token`):
dynamic per-token int8 or float8 e4m3 activations, gradients straight through the quantizers and exact
through the norm and the activation. Prints the test accuracy of each way.
"""

import argparse
import math

import jax
import jax.numpy as jnp
import qat

import baracuda_jax as bj

D, F, BLOCKS, CLASSES = 64, 128, 2, 10


def init(key):
    keys = iter(jax.random.split(key, 3 * BLOCKS + 1))
    normal = lambda shape: jax.random.normal(next(keys), shape, jnp.float32) / math.sqrt(shape[0])
    blocks = [
        dict(norm=jnp.ones(D, jnp.float32), w1=normal((D, F)), w3=normal((D, F)), w2=normal((F, D)) * 0.5)
        for _ in range(BLOCKS)
    ]
    return dict(blocks=blocks, head=normal((D, CLASSES)), bias=jnp.zeros(CLASSES, jnp.float32))


def rms_norm(h, w, eps=1e-6):
    return h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + eps) * w


def forward(params, x, dtype=None):
    """dtype None: float; int8 or float8_e4m3fn: QAT through the fused ops."""
    h = x
    for p in params["blocks"]:
        if dtype is None:
            n = rms_norm(h, p["norm"])
            g = jax.nn.silu(n @ p["w1"]) * (n @ p["w3"])
        else:
            n, h = bj.rms_norm_fake_quantize_per_token(h, p["norm"], dtype=dtype)  # h: the skip path
            g = bj.silu_mul_fake_quantize_per_token(n @ p["w1"], n @ p["w3"], dtype=dtype)
        h = h + g @ p["w2"]
    return h @ params["head"] + params["bias"]


def train(dtype, steps, batch=128, seed=0, data=None):
    """Returns (per-step losses, test accuracy)."""
    x_tr, x_te, y_tr, y_te = data or qat.load(seed)
    loss_fn = lambda params, x, y: qat.cross_entropy(forward(params, x, dtype), y)
    params, losses = qat.fit(loss_fn, init(jax.random.key(seed)), x_tr, y_tr, steps, batch, seed)
    return losses, qat.accuracy(lambda x: forward(params, x, dtype), x_te, y_te)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    args = p.parse_args(argv)
    data = qat.load()
    results = {
        name: train(dtype, args.steps, data=data)
        for name, dtype in (("float", None), ("qat int8", jnp.int8), ("qat e4m3", jnp.float8_e4m3fn))
    }
    print(f"digits, pre-norm SwiGLU x{BLOCKS}, {args.steps} steps of 128, test accuracy:")
    for name, (_, acc) in results.items():
        print(f"  {name:<9} {acc:.4f}")
    return results


if __name__ == "__main__":
    main()
