"""The ops inside a training step: a block's value_and_grad, each way side by side.

    ffn:  x -> RMSNorm -> fake-quant -> @w1, @w3 -> silu * mul -> fake-quant -> @w2 -> + x
    full: x -> RMSNorm -> fake-quant -> @wqkv -> causal attention -> fake-quant -> @wo -> + x -> ffn

The full block is a pre-norm transformer layer: grouped-query attention (heads of 128) through
jax.nn.dot_product_attention (cuDNN's where it compiles, else XLA's), T tokens as [T / S, S], and no
RoPE (an elementwise rotation of q and k, the same work in every way).

Ways, each applied to every projection of the block: float: no quantizer; jnp: dynamic int8
fake-quant in natural jnp with a straight-through gradient (XLA fuses it into the norm and the
activation); fused: rms_norm_fake_quantize_per_token before the QKV and w1/w3 projections,
fake_quantize_per_token_dynamic before wo, silu_mul_fake_quantize_per_token before w2;
fp8_<recipe>: no fake-quant, every projection through fp8_matmul (forward, dgrad and wgrad in
float8). Each is one jitted value_and_grad of a loss in the parameters and x (bf16 parameters and
activations), timed as device time per step (harness.py: the span from the step's first kernel to its
last, median of many steps).

    python benchmarks/train_step.py [--quick] [--block ffn|full|both] [--ways float,fp8_rowwise]
        [--reps 20] [--json benchmarks/results/train_step_<device>.json]   # the .png lands beside it
    python benchmarks/train_step.py --plot benchmarks/results/train_step_<device>.json
"""

import argparse
import functools
import json
import pathlib
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from harness import F32, device_name, fake_quant_ste, kernel_totals, on_gpu, rms_norm, time_per_call, write_json

import baracuda_jax as bj

HEAD = 128  # the attention's head size
SIZES = {
    "ffn": (dict(t=8192, d=4096, f=14336), dict(t=8192, d=2048, f=2048), dict(t=32768, d=1024, f=1024)),
    "full": (  # Llama-3-8B's layer, and a narrower one
        dict(t=8192, s=2048, d=4096, f=14336, heads=32, kv_heads=8),
        dict(t=8192, s=2048, d=2048, f=8192, heads=16, kv_heads=4),
    ),
}
QUICK = {"ffn": (dict(t=512, d=256, f=512),), "full": (dict(t=512, s=256, d=256, f=512, heads=2, kv_heads=1),)}


class Way(NamedTuple):
    norm: Callable  # (x, w) -> (normalized input of the next projection, the residual stream)
    quant: Callable  # the attention output projection's input
    silu_mul: Callable  # (a, b) -> input of w2
    mm: Callable  # every projection


def silu_mul(a, b):
    return (jax.nn.silu(a.astype(F32)) * b.astype(F32)).astype(a.dtype)


def plain_norm(x, w):
    return rms_norm(x, w), x


def identity(v):
    return v


def fp8_way(recipe):
    return Way(plain_norm, identity, silu_mul, functools.partial(bj.fp8_matmul, recipe=recipe))


WAYS = {
    "float": Way(plain_norm, identity, silu_mul, jnp.matmul),
    "jnp": Way(
        lambda x, w: (fake_quant_ste(rms_norm(x, w)), x),
        fake_quant_ste,
        lambda a, b: fake_quant_ste(silu_mul(a, b)),
        jnp.matmul,
    ),
    # the skip connection takes the norm op's residual_out (x itself): its gradient is then added
    # inside the norm's backward kernel, as XLA would fuse the add into its own
    "fused": Way(
        bj.rms_norm_fake_quantize_per_token,
        bj.fake_quantize_per_token_dynamic,
        bj.silu_mul_fake_quantize_per_token,
        jnp.matmul,
    ),
    "fp8_rowwise": fp8_way("rowwise"),
    "fp8_gw_hp": fp8_way("rowwise_with_gw_hp"),
    "fp8_blockwise": fp8_way("blockwise"),
}


def ffn(params, x, way):
    w_norm, w1, w3, w2 = params
    h, x = way.norm(x, w_norm)
    return x + way.mm(way.silu_mul(way.mm(h, w1), way.mm(h, w3)), w2)


def attention(qkv, heads, kv_heads, impl):
    """Causal grouped-query attention of qkv [B, S, (heads + 2 kv_heads) * HEAD]."""
    b, s, _ = qkv.shape
    q, k, v = jnp.split(qkv.reshape(b, s, heads + 2 * kv_heads, HEAD), (heads, heads + kv_heads), axis=2)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    return out.reshape(b, s, heads * HEAD)


def full(params, x, way, heads, kv_heads, impl):
    w_norm, wqkv, wo, *ffn_params = params
    h, x = way.norm(x, w_norm)
    x = x + way.mm(way.quant(attention(way.mm(h, wqkv), heads, kv_heads, impl)), wo)
    return ffn(ffn_params, x, way)


def attention_impl(size):
    """cuDNN's fused attention where its forward and backward compile at this size (a GPU), else XLA's."""
    if not on_gpu():
        return "xla"
    b, s = size["t"] // size["s"], size["s"]
    q = jax.ShapeDtypeStruct((b, s, size["heads"], HEAD), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, s, size["kv_heads"], HEAD), jnp.bfloat16)
    f = lambda *qkv: jax.nn.dot_product_attention(*qkv, is_causal=True, implementation="cudnn").astype(F32).sum()
    try:
        jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
        return "cudnn"
    except Exception as e:  # which exception depends on what cuDNN lacks: report it, and go on
        print(f"  cuDNN attention unavailable, XLA's instead: {type(e).__name__}: {str(e)[:200]}")
        return "xla"


def block_args(block, size):
    """(the block's function, its keyword arguments) at a size."""
    if block == "ffn":
        return ffn, {}
    return full, dict(heads=size["heads"], kv_heads=size["kv_heads"], impl=attention_impl(size))


def step(fn, way, kwargs):
    def loss(params, x):
        return jnp.mean(jnp.square(fn(params, x, WAYS[way], **kwargs).astype(F32)))

    return jax.value_and_grad(loss, argnums=(0, 1))


def inputs(size, seed):
    """(params, x) in bf16: the norms' weights ones, each projection normal / sqrt(fan-in); x [T, D],
    or [T / S, S, D] for the full block."""
    t, d, f = size["t"], size["d"], size["f"]
    shapes = [(d, f), (d, f), (f, d)]  # w1, w3, w2
    if "heads" in size:
        shapes = [(d, (size["heads"] + 2 * size["kv_heads"]) * HEAD), (size["heads"] * HEAD, d), *shapes]
    k = jax.random.split(jax.random.key(seed), len(shapes) + 1)
    w = [jax.random.normal(key, shape, jnp.bfloat16) * shape[0] ** -0.5 for key, shape in zip(k, shapes)]
    norm = jnp.ones((d,), jnp.bfloat16)
    params = (norm, *w[:2], norm, *w[2:]) if "heads" in size else (norm, *w)
    x_shape = (t // size["s"], size["s"], d) if "s" in size else (t, d)
    return params, jax.random.normal(k[-1], x_shape, jnp.bfloat16)


def label(row):
    heads = f" {row['heads']}/{row['kv_heads']} heads" if "heads" in row else ""
    return f"{row['t']}x{row['d']}x{row['f']}{heads}"


def kernel_table(fn, args, top=12):
    """Device time per kernel name over one step (the --profile view of where a step's time goes)."""
    for name, us in kernel_totals(fn, args).most_common(top):
        print(f"    {us:9.1f} us  {name}")


def plot(json_path):
    """A PNG beside the JSON: each way's speed-up over the first one (float by default), one group of
    bars per block and size."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(pathlib.Path(json_path).read_text())
    rows = data["results"]
    base, *ways = [k[3:] for k in rows[0] if k.startswith("us_")]
    width = 0.8 / max(1, len(ways))
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(rows), 4))
    for i, way in enumerate(ways):
        xs = [j + (i - (len(ways) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [r["us_" + base] / r["us_" + way] for r in rows], width, label=way)
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), [f"{r['block']}\n{label(r)}" for r in rows], fontsize=8)
    ax.set(ylabel=f"speed-up over {base}", title=f"train step (value_and_grad, bf16), {data['device']}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = pathlib.Path(json_path).with_suffix(".png")
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small size per block")
    p.add_argument("--block", choices=("ffn", "full", "both"), default="both")
    p.add_argument("--ways", default=",".join(WAYS), help=f"a subset of {','.join(WAYS)}")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", type=pathlib.Path, default=None)
    p.add_argument("--profile", action="store_true", help="also list each way's kernels (GPU)")
    p.add_argument("--plot", type=pathlib.Path, metavar="JSON", help="plot a results file, then exit")
    args = p.parse_args(argv)
    if args.plot:
        return plot(args.plot)
    sizes = QUICK if args.quick else SIZES
    blocks = ("ffn", "full") if args.block == "both" else (args.block,)
    ways = args.ways.split(",")
    print(f"device: {device_name()}, jax {jax.__version__}; device time per step, us (speed-up over the first way)")
    results = []
    for block in blocks:
        print(f"{block:<6}{'T x D x F':>26}" + "".join(f"{w:>20}" for w in ways))
        for size in sizes[block]:
            fn, kwargs = block_args(block, size)
            sets = [inputs(size, seed) for seed in range(1 if args.quick else 2)]  # --quick: half the compiling
            us = {way: 1e6 * time_per_call(step(fn, way, kwargs), sets, args.reps) for way in ways}
            extra = dict(attention=kwargs["impl"]) if "impl" in kwargs else {}
            results.append(dict(block=block, **size, **extra, **{f"us_{k}": v for k, v in us.items()}))
            base = us[ways[0]]
            print(f"{label(size):>32}" + "".join(f"{v:>11.0f} ({base / v:.2f}x)" for v in us.values()), flush=True)
            if args.profile:
                for way in ways:
                    print(f"  {way}:")
                    kernel_table(step(fn, way, kwargs), sets[0])
            if args.json:  # after every row: a run cut short keeps what it measured
                write_json(args.json, dict(device=device_name(), jax=jax.__version__, results=results))
    if args.json:
        plot(args.json)


if __name__ == "__main__":
    main()
