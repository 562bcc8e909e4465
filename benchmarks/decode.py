"""Decode's projections: scaled_matmul at a few tokens, where every call reads its whole weight from
HBM. Device time per call (harness.py) of XLA's bf16 dot and of each GPU route of scaled_matmul,
int8 and float8 (per-token x per-channel scales): cuBLASLt and the small-M kernel; and each one's
share of the copy bandwidth (measured in the same run) on the weight bytes. The weights rotate over
>= 1 GiB of distinct copies, so no call finds its weight in L2.

Shapes: Llama-3-8B's projections (K x N: qkv, o, gate+up, down) and Llama-3-70B's.

With --layers, a stack of decode layers of each model instead (the attention left out: QKV's first D
columns go on to the output projection), the way a jitted decode step runs them (XLA captures such a
step in a CUDA graph): XLA's bf16 layer, the W8A8 ops (rms_norm_w8a8_matmul, w8a8_matmul,
silu_mul_w8a8_matmul) and the same layer as the producers' and scaled_matmul's calls; µs a layer and
the % of the copy bandwidth on the layer's weight bytes.

With --projection, one pre-norm projection alone (the residual add, RMSNorm, the per-token
quantizer and the product): XLA's bf16 layer (its norm fusion and dot), bj.rms_norm_w8a8_matmul (one
custom call at these sizes: the row kernel and the small-M product chained), the same as two calls
(rms_norm_quantize_per_token, then scaled_matmul), and the small-M product alone, each on the same
L2-cold weights.

    python benchmarks/decode.py [--quick] [--json benchmarks/results/decode_<device>.json]
    python benchmarks/decode.py --layers [--quick] [--json benchmarks/results/decode_layers_<device>.json]
    python benchmarks/decode.py --projection [--quick] [--json benchmarks/results/projection_<device>.json]
    python benchmarks/decode.py --plot benchmarks/results/decode_<device>.json <png>
"""

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
from harness import copy_time, device_name, matmul_operands, rms_norm, rotations, time_per_call, write_json

import baracuda_jax as bj
from baracuda_jax import matmul

MODELS = {
    "llama3-8b": ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)),
    "llama3-70b": ((8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192)),
}
MS = (1, 2, 4, 8, 16, 32, 64, 128)
WAYS = ("bf16", "int8_cublaslt", "int8_small_m", "fp8_cublaslt", "fp8_small_m")
COLD = 1 << 30  # bytes of distinct weights a timed way rotates over


def _ways():
    """name -> (weight dtype, function of (a, a_scale, w [N, K], w_scale))."""

    def route(name):
        return lambda a, sa, w, sw: matmul._scaled_matmul_on(name, a, sa, w.T, sw)

    ways = {"bf16": (jnp.bfloat16, lambda a, sa, w, sw: a @ w.T)}
    for dtype, tag in ((jnp.int8, "int8"), (jnp.float8_e4m3fn, "fp8")):
        for name in ("cublaslt", "small_m"):
            ways[f"{tag}_{name}"] = (dtype, route(name))
    return ways


def row(m, k, n, reps, copy_bw, ways=WAYS):
    result = dict(m=m, k=k, n=n)
    for name, (dtype, fn) in _ways().items():
        if name not in ways:
            continue
        weight_bytes = k * n * jnp.dtype(dtype).itemsize
        sets = matmul_operands(jax.random.key(m + k + n), m, k, n, dtype, rotations(weight_bytes, 2, 256, COLD))
        seconds = time_per_call(fn, sets, reps)
        del sets
        result[f"us_{name}"] = seconds * 1e6
        result[f"bw_{name}"] = weight_bytes / seconds / copy_bw  # share of the copy bandwidth
    return result


PROJECTION_WAYS = (
    "bf16_layer",
    "int8_fused",
    "int8_two_calls",
    "int8_product",
    "fp8_fused",
    "fp8_two_calls",
    "fp8_product",
)


def _projection_ways():
    """name -> (weight dtype, function of (x, residual, norm weight, w [N, K], w_scale))."""

    def bf16_layer(x, res, g, w, _):
        r = x + res
        return rms_norm(r, g) @ w.T, r

    def fused(x, res, g, w, sw):
        return bj.rms_norm_w8a8_matmul(x, g, bj.QuantizedWeight(w, sw), residual=res)

    def two_calls(x, res, g, w, sw):
        q, s, r = bj.rms_norm_quantize_per_token(x, g, residual=res, dtype=w.dtype)
        return matmul._scaled_matmul_on("small_m", q, s, w.T, sw), r

    def product(q, s, _, w, sw):  # the rows given quantized: the product's time alone
        return matmul._scaled_matmul_on("small_m", q, s, w.T, sw)

    ways = {"bf16_layer": (jnp.bfloat16, bf16_layer)}
    for dtype, tag in ((jnp.int8, "int8"), (jnp.float8_e4m3fn, "fp8")):
        ways |= {
            f"{tag}_fused": (dtype, fused),
            f"{tag}_two_calls": (dtype, two_calls),
            f"{tag}_product": (dtype, product),
        }
    return ways


def projection_row(m, k, n, reps, copy_bw):
    result = dict(m=m, k=k, n=n)
    kx, kr, kg = jax.random.split(jax.random.key(m + k + n), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    res = jax.random.normal(kr, (m, k), jnp.bfloat16)
    g = 1 + 0.1 * jax.random.normal(kg, (k,), jnp.bfloat16)
    for name, (dtype, fn) in _projection_ways().items():
        weight_bytes = k * n * jnp.dtype(dtype).itemsize
        sets = matmul_operands(jax.random.key(k + n), 1, k, n, dtype, rotations(weight_bytes, 2, 256, COLD))
        rows = (x.astype(dtype), jnp.ones((m,), jnp.float32)) if name.endswith("_product") else (x, res)
        sets = [(*rows, g, w, sw) for _, _, w, sw in sets]
        seconds = time_per_call(fn, sets, reps)
        del sets
        result[f"us_{name}"] = seconds * 1e6
        result[f"bw_{name}"] = weight_bytes / seconds / copy_bw
    return result


LAYERS = 4  # a stack per timed call


def _bf16_layer(x, p):
    g1, wqkv, wo, g2, wgu, wd = p
    x = x + (rms_norm(x, g1) @ wqkv)[..., : x.shape[-1]] @ wo
    gate, up = jnp.split(rms_norm(x, g2) @ wgu, 2, axis=-1)
    return x + (jax.nn.silu(gate) * up) @ wd


def _fused_layer(x, p):
    g1, wqkv, wo, g2, wgu, wd = p
    qkv, _ = bj.rms_norm_w8a8_matmul(x, g1, wqkv)
    x = bj.w8a8_matmul(qkv[..., : x.shape[-1]], wo, residual=x)
    gate, up = jnp.split(bj.rms_norm_w8a8_matmul(x, g2, wgu)[0], 2, axis=-1)
    return bj.silu_mul_w8a8_matmul(gate, up, wd, residual=x)


def _two_calls_layer(x, p):
    g1, wqkv, wo, g2, wgu, wd = p
    q, s, _ = bj.rms_norm_quantize_per_token(x, g1, dtype=wqkv.dtype)
    qkv = bj.scaled_matmul(q, s, wqkv, out_dtype=x.dtype)
    q, s, _ = bj.quantize_per_token_dynamic(qkv[..., : x.shape[-1]], dtype=wo.dtype)
    x = bj.scaled_matmul(q, s, wo, out_dtype=x.dtype, residual=x)
    q, s, _ = bj.rms_norm_quantize_per_token(x, g2, dtype=wgu.dtype)
    gate, up = jnp.split(bj.scaled_matmul(q, s, wgu, out_dtype=x.dtype), 2, axis=-1)
    q, s = bj.silu_mul_quantize_per_token(gate, up, dtype=wd.dtype)
    return bj.scaled_matmul(q, s, wd, out_dtype=x.dtype, residual=x)


def _layer_ways():
    """name -> (weight dtype, layer function of (x, its weights))."""
    ways = {"bf16": (jnp.bfloat16, _bf16_layer)}
    for dtype, tag in ((jnp.int8, "int8"), (jnp.float8_e4m3fn, "fp8")):
        ways |= {f"{tag}_fused": (dtype, _fused_layer), f"{tag}_two_calls": (dtype, _two_calls_layer)}
    return ways


LAYER_WAYS = tuple(_layer_ways())


def _stack(layer):
    def stack(x, layers):
        for p in layers:
            x = layer(x, p)
        return x

    return stack


def layers_row(m, model, reps, copy_bw):
    """µs a layer of a LAYERS-layer decode stack of `model`, each way, weights L2-cold."""
    (d, qkv), _, (_, gate_up), (f, _) = MODELS[model]
    shapes = ((d, qkv), (d, d), (d, gate_up), (f, d))
    result = dict(m=m, k=d, n=qkv)
    key = jax.random.key(m)
    x = jax.random.normal(key, (m, d), jnp.bfloat16)
    norm = jnp.ones((d,), jnp.bfloat16)
    for name, (dtype, layer) in _layer_ways().items():
        prepare = (
            (lambda w: w.astype(dtype)) if dtype == jnp.bfloat16 else (lambda w: bj.quantize_weight(w, dtype=dtype))
        )
        layer_bytes = sum(k * n for k, n in shapes) * jnp.dtype(dtype).itemsize
        weight = lambda i, k, n: prepare(jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.float32) * k**-0.5)
        sets = []
        for j in range(rotations(layer_bytes * LAYERS, 2, 8, COLD)):
            ws = [[weight(100 * (j * LAYERS + i) + s, *kn) for s, kn in enumerate(shapes)] for i in range(LAYERS)]
            sets.append((x, [(norm, wqkv, wo, norm, wgu, wd) for wqkv, wo, wgu, wd in ws]))
        seconds = time_per_call(_stack(layer), sets, reps) / LAYERS
        del sets
        result[f"us_{name}"] = seconds * 1e6
        result[f"bw_{name}"] = layer_bytes / seconds / copy_bw
    return result


def table(results, all_ways=WAYS):
    ways = [w for w in all_ways if "us_" + w in results[0]]
    lines = [
        f"{'M':>4} {'K':>6} {'N':>6} "
        + " ".join(f"{w:>18}" for w in ways)
        + "   (us, % of the copy bandwidth on the weight bytes)"
    ]
    for r in results:
        lines.append(
            f"{r['m']:>4} {r['k']:>6} {r['n']:>6} "
            + " ".join(f"{r['us_' + w]:>11.1f} ({100 * r['bw_' + w]:>3.0f}%)" for w in ways)
        )
    return "\n".join(lines)


def plot(json_path, png_path):
    """Share of the copy bandwidth against M, one panel per projection, one line per way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(pathlib.Path(json_path).read_text())
    shapes = [kn for model in MODELS.values() for kn in model]
    shapes = [kn for kn in shapes if any((r["k"], r["n"]) == kn for r in data["results"])]
    cols = 4
    fig, axes = plt.subplots(-(-len(shapes) // cols), cols, figsize=(4.2 * cols, 3.4 * -(-len(shapes) // cols)))
    style = {
        "bf16": "k--",
        "int8_cublaslt": "C0:",
        "int8_small_m": "C0-",
        "fp8_cublaslt": "C1:",
        "fp8_small_m": "C1-",
    }
    for ax, (k, n) in zip(axes.flat, shapes):
        rows = [r for r in data["results"] if (r["k"], r["n"]) == (k, n)]
        for way in [w for w in WAYS if all("bw_" + w in r for r in rows)]:
            ax.plot([r["m"] for r in rows], [100 * r["bw_" + way] for r in rows], style[way], marker="o", label=way)
        ax.set(xscale="log", xlabel="M (tokens)", title=f"K={k}, N={n}", ylim=(0, 115))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(shapes) :]:
        ax.axis("off")
    axes.flat[0].set_ylabel("% of copy bandwidth (weight bytes)")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"decode projections, weights L2-cold, {data['device']}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="M = 1, 16 and 64 at Llama-3-8B's shapes only")
    p.add_argument("--layers", action="store_true", help="time stacks of decode layers (M <= 16)")
    p.add_argument("--projection", action="store_true", help="time whole pre-norm projections (M <= 16)")
    p.add_argument("--ms", default=None, help="comma-separated token counts (default: all of MS)")
    p.add_argument("--models", default=",".join(MODELS), help=f"a subset of {','.join(MODELS)}")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", type=pathlib.Path, default=None)
    p.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help="plot a results file, then exit")
    args = p.parse_args(argv)
    if args.plot:
        return plot(*args.plot)
    few = args.projection or args.layers
    default_ms = (1, 4, 16) if few else MS
    ms = (
        ((1, 16) if few else (1, 16, 64))
        if args.quick
        else tuple(int(m) for m in args.ms.split(","))
        if args.ms
        else default_ms
    )
    ways = LAYER_WAYS if args.layers else PROJECTION_WAYS if args.projection else WAYS
    models = ["llama3-8b"] if args.quick else args.models.split(",")
    copy_bw = (256 << 20) / copy_time(256 << 20, 4, 10)
    print(f"copy bandwidth {copy_bw * 1e-12:.2f} TB/s", flush=True)
    results = []
    for model in models:
        for m, kn in [(m, None) for m in ms] if args.layers else [(m, kn) for kn in MODELS[model] for m in ms]:
            if args.layers:
                measured = layers_row(m, model, args.reps, copy_bw)
            else:
                measured = (projection_row if args.projection else row)(m, *kn, args.reps, copy_bw)
            results.append(dict(model=model, **measured))
            print(table(results[-1:], ways).splitlines()[-1], flush=True)
            if args.json:  # after every row: a long run cut short keeps what it measured
                meta = dict(device=device_name(), jax=jax.__version__, copy_bw=copy_bw)
                write_json(args.json, dict(meta, results=results))
    print(f"\n{device_name()}, jax {jax.__version__}, copy {copy_bw * 1e-12:.2f} TB/s\n" + table(results, ways))


if __name__ == "__main__":
    main()
