"""What the test files share: seeds and shapes, running on a device, the comparisons the spec table
states (baracuda_jax/specs.py), the table's (spec, case, shape) parameters, and GPU helpers. The
operands come from baracuda_jax.specs."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baracuda_jax import specs

# ---- seeds and shapes ---------------------------------------------------------------------------

# Leading dims, odd D, D=1 and N=0 among them.
SHAPES = ((1,), (7,), (3, 1), (5, 8), (4, 33), (2, 3, 17), (2, 0, 9), (0, 4), (3, 4, 0), (16, 4097))


def rng():
    """A generator on a fresh seed, printed so that pytest shows it on failure."""
    seed = np.random.SeedSequence().entropy
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def key(r):
    """A jax.random key drawn from r."""
    return jax.random.key(int(r.integers(2**63)))


# ---- devices ------------------------------------------------------------------------------------


def _gpus():
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


GPUS = _gpus()
CPU = jax.devices("cpu")[0]
DEVICES = [CPU] + GPUS[:1]
requires_gpu = pytest.mark.skipif(not GPUS, reason="needs a CUDA GPU")


def run(device, fn, *args, **kw):
    args = jax.device_put(args, device)
    return jax.jit(lambda *a: fn(*a, **kw))(*args)


def on(device_kind, fn, *args, **kw):
    """fn jitted on the first GPU ("gpu") or the CPU."""
    return run(GPUS[0] if device_kind == "gpu" else CPU, fn, *args, **kw)


def assert_captured(fn, args, custom_calls, runs=10):
    """XLA replays fn's custom calls from a CUDA graph: after two runs (compile, then record), the
    handler bodies run fewer times than `custom_calls` per execution. Returns the last outputs."""
    from baracuda_jax import _cuda

    for _ in range(2):
        jax.block_until_ready(fn(*args))
    before = _cuda.handler_calls()
    for _ in range(runs):
        out = jax.block_until_ready(fn(*args))
    calls = _cuda.handler_calls() - before
    print(f"handler calls over {runs} runs of {custom_calls} custom calls: {calls}")
    assert calls < custom_calls * runs
    return out


# ---- comparisons --------------------------------------------------------------------------------


def assert_same_bits(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    if np.issubdtype(got.dtype, np.integer):
        np.testing.assert_array_equal(got, want)
        return
    nan = np.isnan(got.astype(np.float64))
    np.testing.assert_array_equal(nan, np.isnan(want.astype(np.float64)), err_msg="NaN positions differ")
    bits = f"uint{8 * got.dtype.itemsize}"
    bad = (got.view(bits) != want.view(bits)) & ~nan
    assert not bad.any(), f"{bad.sum()} of {bad.size} differ; first: got {got[bad][:5]}, want {want[bad][:5]}"


def same_scale_rows(q, s, q_ref, s_ref):
    """A dynamic row whose amax moved across a rounding boundary gets another scale, and then most of
    its values move by a step: such rows (at most a few) are left out of the comparison."""
    s, s_ref = np.asarray(s), np.asarray(s_ref)
    same = s == s_ref
    assert (~same).sum() <= max(1, same.size // 16), f"{(~same).sum()} of {same.size} rows' scales differ"
    return np.asarray(q.astype(jnp.float32))[same], np.asarray(q_ref.astype(jnp.float32))[same]


def assert_close_quantized(got, want, fmt, what):
    """Equal but for at most MISMATCH of the values, each by one step of the grid."""
    got, want = np.asarray(got).astype(np.float64), np.asarray(want).astype(np.float64)
    nan = np.isnan(got)
    np.testing.assert_array_equal(nan, np.isnan(want), err_msg=f"{what}: NaN positions differ")
    diff = got[~nan] != want[~nan]
    assert diff.mean() <= specs.MISMATCH if diff.size else True, f"{what}: {diff.sum()} of {diff.size} differ"
    if not jnp.issubdtype(fmt, jnp.floating):
        assert np.all(np.abs(got[~nan] - want[~nan]) <= 1), f"{what}: a value differs by more than one step"


# scaled_matmul's tolerance against the float64 product (tests/test_matmul.py's docstring states it)
MATMUL_OUT_DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]
HALF_ULP = {np.dtype(t): 2.0 ** -jnp.finfo(t).nmant / 2 for t in MATMUL_OUT_DTYPES}  # relative, normal numbers
HALF_TINY = {np.dtype(t): float(jnp.finfo(t).smallest_subnormal) / 2 for t in MATMUL_OUT_DTYPES}  # subnormals
GPU_SUM_ERROR = 2.0**-11


def exact_product(a, a_scale, b, b_scale):
    """The float64 product of the operands (exact for these sizes) and the sum of |products|."""
    a64, b64 = (np.asarray(x.astype(jnp.float32), np.float64) for x in (a, b))
    sa, sb = np.asarray(a_scale, np.float64), np.asarray(b_scale, np.float64)
    if sb.ndim == 2:  # blockwise: scale each element of a and b by its block's scale
        a64, b64 = a64 * np.repeat(sa, 128, axis=-1), b64 * np.repeat(np.repeat(sb, 128, 0), 128, 1)
        sa = sb = np.float64(1)
    sa = sa[..., None] if sa.ndim else sa
    return a64 @ b64 * sa * sb, np.abs(a64) @ np.abs(b64) * np.abs(sa) * np.abs(sb)


def assert_product_close(out, a, a_scale, b, b_scale, sum_error, residual=None):
    """Within the matmul's tolerance; a residual adds one float32 rounding of the sum. Where the
    product is NaN (a NaN scale), out must be NaN."""
    want, magnitude = exact_product(a, a_scale, b, b_scale)
    add = 0.0
    if residual is not None:
        r = np.asarray(residual.astype(jnp.float32), np.float64)
        add, want = 2.0**-24 * (np.abs(want) + np.abs(r)), want + r
    got = np.asarray(out.astype(jnp.float32), np.float64)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got[nan]), True, err_msg="NaN positions differ")
    got, want, magnitude = got[~nan], want[~nan], np.broadcast_to(magnitude, nan.shape)[~nan]
    add = np.broadcast_to(add, nan.shape)[~nan]
    dtype = np.dtype(out.dtype)
    bound = (HALF_ULP[dtype] + 2.0**-22) * np.abs(want) + sum_error * magnitude + add + HALF_TINY[dtype]
    err = np.abs(got - want)
    assert np.all(err <= bound), f"worst error {np.max(err / bound):.2f} x the bound, at {np.argmax(err / bound)}"


def _by_dtype(pair, case):
    return pair[1] if case.x_dtype == np.float32 else pair[0]


def _same_rows(s, s_ref):
    """The rows whose scales agree (NaN with NaN); at most one row in 16 may differ."""
    s, s_ref = np.asarray(s), np.asarray(s_ref)
    same = (s == s_ref) | (np.isnan(s) & np.isnan(s_ref))
    assert (~same).sum() <= max(1, same.size // 16), f"{(~same).sum()} of {same.size} rows' scales differ"
    return same


def _bounded(spec, case, got, want, scales):
    """The fused forward ops' rule (specs: "bounded"), on results named q or y, scale, r."""
    named = dict(zip(spec.results, zip(got, want)))
    if "r" in named:  # the new residual stream
        assert_same_bits(*named["r"])
    scales = named.get("scale", scales)
    if scales is not None:
        np.testing.assert_allclose(np.asarray(scales[0]), np.asarray(scales[1]), rtol=_by_dtype(spec.rtol, case))
    if spec.dynamic and spec.row_reduction and case.x_dtype == np.float32:
        return  # a dynamic float32 scale moves with its amax's ulp: the values are not compared
    fake = "y" in named
    q, q_ref = named["y" if fake else "q"]
    if spec.dynamic:
        same = _same_rows(*scales)
        q, q_ref = np.asarray(q.astype(jnp.float32))[same], np.asarray(q_ref.astype(jnp.float32))[same]
    assert_close_quantized(q, q_ref, case.x_dtype if fake else case.fmt.dtype, "y" if fake else "q")


def product_sum_error(spec, case, inputs, platform):
    """The matmul bound's sum term: the GPU's tensor cores' partial sums, or float32's K * 2**-24 (and
    a blockwise sum's four roundings a block) on the CPU (tests/test_matmul.py states both)."""
    k = np.shape(inputs["q"])[-1]
    if platform == "gpu" and case.fmt.is_float:
        return GPU_SUM_ERROR
    return (k + 4 * k // specs.BLOCK * (spec.multiple > 1)) * 2.0**-24  # int8 blockwise: XLA's dot there too


def compare(spec, case, got, want, inputs=None, platform="cpu", scales=None, same_program=True):
    """got against want by the rule the spec states (specs.py's docstring). inputs: the operands
    (the matmul's bound); platform: where got ran; scales: (got's, want's) row scales of a dynamic
    fake-quantize row (its `scales_from` row's); same_program: want is got's XLA program (on the
    CPU the float8 matmul is XLA's dot, whose float32 sum order depends on its shape: another
    program, e.g. on token shards, is held to the float64 bound)."""
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want) == len(spec.results), (len(got), len(want), spec.results)
    if spec.compare == "bounded":
        return _bounded(spec, case, got, want, scales)
    for i, (g, w) in enumerate(zip(got, want)):
        if spec.compare == "row_sum" and i == 1:
            bound = max(-case.fmt.lowest, case.fmt.max)
            d = np.shape(inputs["x"])[-1] if inputs is not None else 1
            np.testing.assert_allclose(
                np.asarray(g), np.asarray(w), rtol=specs.SUM_RTOL, atol=specs.SUM_ATOL * d * bound
            )
        elif spec.compare == "close":
            assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, w.dtype, g.shape, w.shape)
            g64, w64 = np.asarray(g, np.float64), np.asarray(w, np.float64)
            big = np.nanmax(np.abs(np.where(np.isinf(w64), np.nan, w64)), initial=0)
            rtol, atol = (u * float(jnp.finfo(t).eps) for u, t in zip(specs.CLOSE_ULPS, (g.dtype, jnp.float32)))
            np.testing.assert_allclose(g64, w64, rtol=rtol, atol=atol * big)
        # float8, and int8 blockwise (its blocks' terms added in float32), sum in an order of their own
        elif (
            spec.compare == "product"
            and (case.fmt.is_float or spec.multiple > 1)
            and (platform != "cpu" or not same_program)
        ):
            args = spec.args(inputs)
            assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
            residual = args[4] if len(args) > 4 else None
            assert_product_close(g, *args[:4], product_sum_error(spec, case, inputs, platform), residual)
        else:
            assert_same_bits(g, w)


def sub_grid(r, case):
    """Half the time, an integer case quantizes to a random sub-grid of its range."""
    if case.fmt.is_float or r.random() < 0.5:
        return case
    lo = int(r.integers(case.fmt.lowest, case.fmt.max // 2))
    return dataclasses.replace(case, grid=(lo, int(r.integers(lo, case.fmt.max + 1))))


def runnable(spec, case):
    """The cases an op takes (the spec states them)."""
    return spec.takes(case)


# ---- the table's parameters ---------------------------------------------------------------------

# The shapes each family's rows run on in the bit-exact suite: (x's shape, the matmul's N or None).
# The fused rows on the shapes test_fused.py's general-data tests took (SiLU's five: D odd, and
# past a vector's width; the norm's 64 x 1024, and an odd D); the groups on one to a few groups per
# row and an empty tensor; the matmul with K and N multiples of 16 (the GPU's cuBLASLt path) and
# not (its XLA fallback), blockwise with K / 128 = 3 (b_scale padded on the GPU) and M = 33
# (a_scale's rows unaligned).
FUSED_SHAPES = ((1, 8), (7, 33), (2, 3, 40), (4, 1000), (3, 4096))
TABLE_SHAPES = {
    "per_token": [(s, None) for s in SHAPES],
    "fused": [(s, None) for s in FUSED_SHAPES],
    "groups": [((3, 256), None), ((2, 5, 384), None), ((0, 128), None)],
    "matmul": [((7, 48), 32), ((33, 40), 24)],
}
SPEC_SHAPES = {  # rows that run on other shapes than their family's
    **{
        s.name: [((7, 33), None), ((64, 1024), None)]
        for s in specs.select("fused")
        if s.exact_on_integers  # the norm's forward rows
    },
    "norm_backward": [((6, 5, 48), None), ((4, 1000), None)],
    "norm_backward_res": [((6, 5, 48), None), ((4, 1000), None)],
    "silu_backward": [((9, 40), None), ((4, 1000), None)],
    "matmul_residual": [((7, 48), 32), ((2, 5, 64), 80)],
    "matmul_blockwise": [((2, 5, 384), 256), ((33, 256), 128)],
}


def table_shapes(spec, shapes=TABLE_SHAPES, overrides=SPEC_SHAPES):
    return [(s, n) for s, n in overrides.get(spec.name, shapes[spec.family]) if spec.fits(s, n)]


def shape_id(shape, n):
    return str(shape) if n is None else f"{shape}x{n}"


def table(shapes=TABLE_SHAPES, overrides=SPEC_SHAPES, families=()):
    """pytest params (spec, case, shape, n): every row of the table over its cases and shapes."""
    return [
        pytest.param(spec, case, shape, n, id=f"{spec.name}-{case.id}-{shape_id(shape, n)}")
        for spec in specs.select(*families)
        for case in specs.cases()
        if spec.takes(case)
        for shape, n in table_shapes(spec, shapes, overrides)
    ]


@functools.lru_cache(maxsize=64)
def jitted(name, case, which):
    """specs.SPECS[name].ours(case) or .reference(case) (which), jitted once: a row's test and a
    dynamic fake-quantize row's `scales_from` use share its compilations."""
    return jax.jit(getattr(specs.SPECS[name], which)(case))


def run_spec(device, spec, case, which, args):
    """The row's function (ours or reference) on device."""
    return jitted(spec.name, case, which)(*jax.device_put(args, device))


def row_scales(spec, case, args, device, reference_device=None):
    """A dynamic fake-quantize row's scales: its `scales_from` row's second result, ours on device
    and the reference on reference_device (default: device)."""
    if spec.scales_from is None:
        return None
    twin = specs.SPECS[spec.scales_from]
    return (
        run_spec(device, twin, case, "ours", args)[1],
        run_spec(reference_device or device, twin, case, "reference", args)[1],
    )


# ---- data the family tests share ----------------------------------------------------------------


# The dynamic ops' grids: (dtype, symmetric).
DYNAMIC_GRIDS = [
    (jnp.int8, True),
    (jnp.int8, False),
    (jnp.uint8, False),
    (jnp.float8_e4m3fn, True),
    (jnp.float8_e5m2, True),
]
DYNAMIC_GRID_IDS = ["int8-sym", "int8-asym", "uint8-asym", "e4m3-sym", "e5m2-sym"]


def dynamic_input(r, shape, dtype, subnormals):
    """Random rows of varied magnitude, plus rows that are all zero, all NaN, constant, or hold inf."""
    rows = shape[:-1]
    mags = specs.scales(key(r), rows, edges=False)
    x = np.array(specs.activations(key(r), shape, specs.case(np.float64, np.int8), mags, subnormals=subnormals))
    flat = x.reshape(-1, shape[-1]) if x.size else x
    kinds = [0.0, np.nan, 3.0, "inf", "-inf"]
    for _i, kind in enumerate(kinds[: flat.shape[0] // 2] if x.size else []):
        row = flat[r.integers(flat.shape[0])]
        if isinstance(kind, str):
            row[r.integers(row.size)] = float(kind)
        else:
            row[:] = kind
    return jnp.asarray(x, dtype)


def integer_valued(r, shape, dtype, lo=-8, hi=8, specials=True):
    """specs.integer_valued from the generator r."""
    return specs.integer_valued(key(r), shape, dtype, lo, hi, specials)


def weight_of(r, d, dtype):
    """specs.norm_weight from the generator r."""
    return specs.norm_weight(key(r), d, dtype)


def static_scale(r, rows, fmt):
    """Per-row scales that put h's values across the grid and past it (specs.static_scales)."""
    return specs.static_scales(key(r), rows, specs.FORMATS[np.dtype(fmt)])
