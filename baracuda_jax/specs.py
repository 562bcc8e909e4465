"""The one case table of the ops, shared by the tests and the benchmarks (in the spirit of tokamax's
arg_specs: one table, many suites).

Each row (`OpSpec`) is one public op or backward kernel of a family (per_token, fused, groups,
matmul): the operands it takes, by role, and the results it gives, by name; ours and the jnp
reference as functions of those operands; the cases (`Case`: data dtype, output format, zero
point, sub-grid) and shapes it takes (`takes`, `fits`); how its results are compared with the
reference's (`compare`, below); and the bytes it must move (`bytes_per_element`, `nbytes`).
`inputs` draws a family's operands for a shape and a case, each on first use, with fresh random
data: per-token values spread over the whole grid and past it, exact ties of the format's
rounding, and (for tests) NaN, +-inf, zeros and subnormals; the fused ops' normal data (or
integer-valued data, whose sums are exact); every stored value of a format for the matmul.

The tests run every row over its cases against its reference (tests/test_bitexact.py), the GPU
kernels against the CPU ones (test_gpu.py), and token and D sharded (test_sharding.py); the
benchmarks time the same functions on large shapes (`select` picks a family's rows).

How a row is compared (`OpSpec.compare`):

  "bits"     every result bit for bit (NaN: in the same places).
  "row_sum"  bit for bit, but the second result, a per-row sum (LSQ's ds), to float rounding: the
             kernels and XLA add in different orders, over terms of up to the grid's bound times
             |g|: rtol SUM_RTOL, atol SUM_ATOL * D * bound.
  "bounded"  the fused forward ops on general data. The kernels' row sums and exp are not XLA's,
             so h moves by an ulp of float32 at most before its rounding: the residual stream r
             bit for bit; the scales to `rtol`; the quantized values (q, or y) equal but for at
             most MISMATCH of them, each by one step of an integer grid, in the rows whose scales
             agree (at most one row in 16 may differ; a dynamic fake-quantize row's scales come from
             its `scales_from` row). Where h comes from a row sum (`row_reduction`, the norm), a
             float32 dynamic scale moves with every amax's ulp: its rows' values are not compared.
             On integer-valued data (`exact_on_integers`: every sum of squares exact, D a power of
             two) the norm ops are bit for bit (tests/test_fused.py).
  "close"    the fused backward kernels against jax.vjp of the reference forward with a
             straight-through quantizer at the kernel's scale (the reference on the CPU): every
             result within CLOSE_ULPS: rtol that many eps of the data's dtype (the final rounding
             of float32 values that differ in their last bits), atol that many eps of float32
             times the result's largest finite magnitude (the row sums' orders).
  "product"  scaled_matmul: int8 with per-channel scales bit for bit (its int32 sum is exact; the
             reference runs on the CPU, where XLA does not contract the multiply and add); float8,
             and blockwise scales (the blocks' terms added in float32), bit for bit against the
             same XLA program on the CPU (ours lowers to the reference there), and otherwise (on a
             GPU: the tensor cores' partial sums, XLA:GPU's order; on the CPU for other shapes,
             e.g. token shards: XLA's dot picks its float32 sum order by shape) within the float64
             product's bound (tests/helpers.assert_product_close; tests/test_matmul.py states it).
             The operands are test_matmul's, the data that bound was measured on.
"""

import collections.abc
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import baracuda_jax as bj
from baracuda_jax import _checks
from baracuda_jax import reference as ref
from baracuda_jax._formats import FORMATS, Format
from baracuda_jax.fused import rms_norm_grad_p, silu_mul_grad_p
from baracuda_jax.ops import fake_quantize_grad_p, fake_quantize_lsq_grad_p

FLOATS = tuple(np.dtype(t) for t in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))
FUSED_FLOATS = FLOATS[:3]  # the fused ops' and the matmul output's data types: no float64
FAMILIES = ("per_token", "fused", "groups", "matmul")

# The stated tolerances (see the module docstring).
SUM_RTOL, SUM_ATOL = 1e-4, 2e-6  # "row_sum": rtol; atol per element of the row and unit of the bound
MISMATCH = 2e-3  # "bounded": the fraction of quantized values that may differ, each by one step
CLOSE_ULPS = (2, 16)  # "close": rtol in eps of the data's dtype, atol in eps of float32 x max |result|
GROUP_SIZE = 128  # the groups rows' group size (tests/test_groups.py covers 32 and 64 too)
BLOCK = 128  # scaled_matmul's blockwise scales: 1 x 128 groups of a, 128 x 128 blocks of b
EPS = 1e-6  # the norm's default eps
MIN_SCALE = 0.05  # the min_scale rows' floor: above the scale of 5-20 % of the drawn rows, below the others'


@dataclasses.dataclass(frozen=True)
class Case:
    x_dtype: np.dtype  # the data's dtype (dequantize's and the matmul's output dtype)
    fmt: Format
    zero_point: bool = False  # integer formats only
    grid: tuple[int, int] | None = None  # an integer sub-grid (qmin, qmax); None: the full range

    @property
    def id(self):
        grid = f"[{self.grid[0]},{self.grid[1]}]" if self.grid else ""
        return f"{self.x_dtype.name}-{self.fmt.name}{grid}{'-zp' if self.zero_point else ''}"

    def kwargs(self):
        if self.grid is None:
            return dict(dtype=self.fmt.dtype)
        return dict(dtype=self.fmt.dtype, qmin=self.grid[0], qmax=self.grid[1])

    @property
    def symmetric(self):
        return not self.zero_point

    @property
    def qrange(self):
        """(qmin, qmax): the sub-grid, or the format's whole range."""
        return self.grid or (self.fmt.lowest, self.fmt.max)


def case(x_dtype, q_dtype, zero_point=False):
    return Case(np.dtype(x_dtype), FORMATS[np.dtype(q_dtype)], zero_point)


ALL_FORMATS = tuple(FORMATS.values())
SIGNED_FORMATS = tuple(f for f in ALL_FORMATS if f.lowest < 0)  # the symmetric grids
MATMUL_FORMATS = (FORMATS[np.dtype(jnp.int8)], FORMATS[np.dtype(jnp.float8_e4m3fn)])


def cases(x_dtypes=FLOATS, formats=ALL_FORMATS):
    """The dtype matrix: every float x, every format, symmetric and (integer formats) with a zero point."""
    return [
        Case(np.dtype(x), f, zp)
        for x in x_dtypes
        for f in formats
        for zp in ((False, True) if not f.is_float else (False,))
    ]


# ---- operands ----------------------------------------------------------------------------------

# Draws of at most this many values are made with numpy on the host, from a generator seeded by the
# key (jax.random and eager jnp compile for every new shape: most of a small test's time), larger
# ones with jax.random and jnp on the device (the benchmarks' shapes). The public functions below
# return jax arrays either way; the _host_or_device ones work in the namespace `xp` they are given.
HOST_DRAWS = 1 << 20


def _xp(shape):
    return np if int(np.prod(shape)) <= HOST_DRAWS else jnp


def _rng(key):
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())


def _uniform(xp, key, shape, lo, hi):
    """float32, uniform in [lo, hi)."""
    if xp is jnp:
        return jax.random.uniform(key, shape, jnp.float32, lo, hi)
    u = _rng(key).uniform(lo, hi, shape).astype(np.float32)
    return np.minimum(u, np.nextafter(np.float32(hi), np.float32(-np.inf)))


def _bernoulli(xp, key, p, shape):
    return jax.random.bernoulli(key, p, shape) if xp is jnp else _rng(key).random(shape) < p


def _randint(xp, key, shape, lo, hi):
    """int32 in [lo, hi)."""
    if xp is jnp:
        return jax.random.randint(key, shape, lo, hi, jnp.int32)
    return _rng(key).integers(lo, hi, shape).astype(np.int32)


def _normal(xp, key, shape):
    """float32, standard normal."""
    return jax.random.normal(key, shape, jnp.float32) if xp is jnp else _rng(key).standard_normal(shape, np.float32)


def _choice(xp, key, n, m):
    """m distinct indices in [0, n)."""
    return jax.random.choice(key, n, (m,), replace=False) if xp is jnp else _rng(key).choice(n, m, replace=False)


def _bitcast(xp, codes, dtype):
    return jax.lax.bitcast_convert_type(codes, dtype) if xp is jnp else codes.view(dtype)


def _set_flat(xp, x, idx, values):
    """x with x.reshape(-1)[idx] = values."""
    values = xp.asarray(values).astype(x.dtype)
    if xp is jnp:
        return x.reshape(-1).at[jnp.asarray(idx)].set(values).reshape(x.shape)
    x = np.array(x)
    x.reshape(-1)[idx] = values
    return x


def _as_jax(fn):
    """The public draw: numpy results as jax arrays."""

    def draw(*args, **kw):
        out = fn(*args, **kw)
        return jnp.asarray(out) if isinstance(out, np.ndarray) else out

    draw.__name__, draw.__doc__ = fn.__name__, fn.__doc__
    return draw


def _f8_ties(xp, key, shape, fmt):
    """Midpoints between neighbouring finite values of a float8 format (exact ties of its rounding)."""
    codes = _randint(xp, key, shape, 0, 0x7F).astype(np.uint8)
    lo = _bitcast(xp, codes, fmt.dtype).astype(np.float32)
    hi = _bitcast(xp, codes + np.uint8(1), fmt.dtype).astype(np.float32)
    return xp.where(xp.isfinite(hi), (lo + hi) / np.float32(2), lo)


def _grid_values(key, shape, fmt: Format):
    xp = _xp(shape)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    sign = xp.where(_bernoulli(xp, k1, 0.5, shape), np.float32(-1), np.float32(1))
    is_tie = _bernoulli(xp, k2, 0.3, shape)
    if not fmt.is_float:
        v = _uniform(xp, k3, shape, -300, 300)
        return xp.where(is_tie, xp.round(v) + np.float32(0.5), v)
    tiny = float(jnp.finfo(fmt.dtype).smallest_subnormal)
    log2 = _uniform(xp, k3, shape, np.log2(tiny / 4), np.log2(1.2 * fmt.max))
    return sign * xp.where(is_tie, _f8_ties(xp, k4, shape, fmt), xp.exp2(log2))


@_as_jax
def grid_values(key, shape, fmt: Format):
    """Values v = x/scale across the format's grid and past it, 30 % of them exact ties."""
    return _grid_values(key, shape, fmt)


@_as_jax
def scales(key, rows, dtype=jnp.float32, edges=True):
    """Positive scales, half of them powers of two (so that x * inv keeps exact ties); with edges,
    a few rows get 0, inf, NaN and a negative scale."""
    xp = _xp(rows)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    s = xp.where(
        _bernoulli(xp, k1, 0.5, rows),
        xp.exp2(_randint(xp, k2, rows, -8, 3).astype(np.float32)),
        _uniform(xp, k3, rows, 1e-3, 4.0),
    )
    n = int(np.prod(rows))
    if edges and n >= 6:
        s = _set_flat(xp, s, _choice(xp, k4, n, 4), [0.0, np.inf, np.nan, -0.5])
    return s.astype(dtype)


@_as_jax
def zero_points(key, rows, qmin, qmax, edges=True):
    """Zero points on the grid; with edges, two rows get one outside it (still defined: clamped)."""
    xp = _xp(rows)
    k1, k2 = jax.random.split(key)
    zp = _randint(xp, k1, rows, qmin, qmax + 1)
    n = int(np.prod(rows))
    if edges and n >= 4:
        zp = _set_flat(xp, zp, _choice(xp, k2, n, 2), [qmax + 40, qmin - 40])
    return zp


@_as_jax
def activations(key, shape, case: Case, scale, edges=True, subnormals=True):
    """x = v * scale with v from grid_values; with edges, NaN, +-inf, +-0, tiny and huge values.

    XLA:CPU computes with subnormals flushed to zero while the kernels (and XLA:GPU) keep them, so
    comparisons against the jnp reference on CPU pass subnormals=False."""
    xp = _xp(shape)
    k1, k2 = jax.random.split(key)
    s = xp.asarray(scale).astype(np.float32)
    s = xp.where(xp.isfinite(s) & (s != 0), s, np.float32(1))[..., None]
    with np.errstate(over="ignore"):  # past the dtype's range: inf, as intended
        x = (_grid_values(k1, shape, case.fmt) * s).astype(case.x_dtype)
        tiny = [1e-40, -3e-39] if subnormals else [1e-3, -2e-3]
        special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, *tiny, 1e30], np.float64).astype(case.x_dtype)
    if edges and x.size >= 16:
        x = _set_flat(xp, x, _choice(xp, k2, x.size, special.size), special)
    return x


@_as_jax
def quantized(key, shape, fmt: Format):
    """Every stored value of the format, uniformly (float8: every bit pattern but NaN)."""
    xp = _xp(shape)
    if fmt.is_float:
        q = _bitcast(xp, _randint(xp, key, shape, 0, 256).astype(np.uint8), fmt.dtype)
        return xp.where(xp.isnan(q.astype(np.float32)), xp.zeros((), fmt.dtype), q)
    return _randint(xp, key, shape, fmt.lowest, fmt.max + 1).astype(fmt.dtype)


@_as_jax
def matmul_values(key, shape, fmt: Format):
    """A matmul operand as tests/test_matmul.py draws it, the data its GPU bound was measured on:
    int8 in [-127, 127]; float8 normal with sd 64, clipped to [-fmax, fmax]."""
    xp = _xp(shape)
    if fmt.is_float:
        v = _normal(xp, key, shape) * np.float32(64)
        return xp.clip(v, -fmt.max, fmt.max).astype(fmt.dtype)
    return _randint(xp, key, shape, -fmt.max, fmt.max + 1).astype(fmt.dtype)


@_as_jax
def normal(key, shape, dtype, std=1.0):
    """Normal data (drawn in float32), in dtype."""
    return (_normal(_xp(shape), key, shape) * np.float32(std)).astype(dtype)


def _with_specials(xp, x):
    if x.ndim and x.shape[-1] and x.size // x.shape[-1] >= 3:
        d = x.shape[-1]
        return _set_flat(xp, x, [d, 3 * d - 1], [np.nan, np.inf])  # [1, 0] and [2, -1] of the rows
    return x


@_as_jax
def with_specials(x):
    """One row gets a NaN (its first value), another an inf (its last), where there are 3 rows."""
    xp = _xp(np.shape(x))
    return _with_specials(xp, xp.asarray(x))


@_as_jax
def integer_valued(key, shape, dtype, lo=-8, hi=8, specials=True):
    """Integers in [lo, hi] (exact squares and sums in float32 for rows up to 65536 wide); with
    specials, one row gets a NaN, one an inf."""
    xp = _xp(shape)
    x = _randint(xp, key, shape, lo, hi + 1).astype(np.float32)
    return (_with_specials(xp, x) if specials else x).astype(dtype)


@_as_jax
def norm_weight(key, d, dtype):
    """A norm's [D] weight, in [0.5, 1.5)."""
    return _uniform(_xp((d,)), key, (d,), 0.5, 1.5).astype(dtype)


@_as_jax
def static_scales(key, rows, fmt: Format, edges=False):
    """Per-row scales that put a fused op's h (of magnitude ~1) across the grid and past it; with
    edges, a few rows get 0, inf, NaN and a negative scale (as `scales`)."""
    xp = _xp(rows)
    k1, k2 = jax.random.split(key)
    s = _uniform(xp, k1, rows, 0.5, 3.0) / np.float32(fmt.max)
    n = int(np.prod(rows))
    if edges and n >= 6:
        s = _set_flat(xp, s, _choice(xp, k2, n, 4), [0.0, np.inf, np.nan, -0.5])
    return s


def inv_rms(r, eps=EPS):
    """The norm forward's per-row 1/sqrt(mean(r^2) + eps), in float32: the norm backward's operand."""
    rf = jnp.asarray(r).astype(jnp.float32)
    mean = jnp.sum(rf * rf, axis=-1) * (np.float32(1) / np.float32(max(r.shape[-1], 1)))
    return 1 / jnp.sqrt(mean + np.float32(eps))


@_as_jax
def matmul_scales(key, shape, edges=False):
    """Positive scales over two decades, 1e-4 to 1e-2; with edges, a row gets NaN and one 0 (no inf:
    0 * inf would make a row's NaNs depend on the sum's rounding)."""
    xp = _xp(shape)
    k1, k2 = jax.random.split(key)
    s = (np.float32(10) ** _uniform(xp, k1, shape, -4.0, -2.0)).astype(np.float32)
    n = int(np.prod(shape))
    if edges and n >= 4:
        s = _set_flat(xp, s, _choice(xp, k2, n, 2), [np.nan, 0.0])
    return s


# Each family's roles: role -> (its layout against the rows, how it is drawn). Layouts: "rows" is
# [..., D] (token-sharded and D-sharded with the data), "per_row" [...], "row_groups" [..., G] (one
# value per group of a row: sharded with the rows, never along G), "whole" a [D] weight or a [K, N]
# matrix (never split). Drawn from (key, shape, case, edges, subnormals, n, integers, the mapping).


def _rows(shape):
    return tuple(shape[:-1])


_PER_TOKEN = {
    "x": ("rows", lambda k, s, c, e, sub, n, i, d: activations(k, s, c, d["scale"], e, sub)),
    "scale": ("per_row", lambda k, s, c, e, sub, n, i, d: scales(k, _rows(s), jnp.float32, e)),
    "zero_point": (
        "per_row",
        lambda k, s, c, e, sub, n, i, d: zero_points(k, _rows(s), *c.qrange, e) if c.zero_point else None,
    ),
    "q": ("rows", lambda k, s, c, e, sub, n, i, d: quantized(k, s, c.fmt)),
    "g": ("rows", lambda k, s, c, e, sub, n, i, d: normal(k, s, c.x_dtype)),
}


def _fused_data(std, specials):
    def draw(k, s, c, e, sub, n, i, d):
        if i:
            return integer_valued(k, s, c.x_dtype, specials=specials and e)
        x = normal(k, s, c.x_dtype, std)
        return with_specials(x) if specials and e else x

    return draw


_FUSED = {
    "x": ("rows", _fused_data(1.0, True)),  # the norm's input (its backward's r)
    "residual": ("rows", _fused_data(1.0, False)),
    "weight": ("whole", lambda k, s, c, e, sub, n, i, d: norm_weight(k, s[-1], c.x_dtype)),
    "scale": ("per_row", lambda k, s, c, e, sub, n, i, d: static_scales(k, _rows(s), c.fmt, e)),
    "a": ("rows", _fused_data(3.0, True)),  # SiLU's gate
    "b": ("rows", _fused_data(2.0, False)),  # SiLU's up projection
    "g": ("rows", lambda k, s, c, e, sub, n, i, d: normal(k, s, c.x_dtype)),
    "g_residual": ("rows", lambda k, s, c, e, sub, n, i, d: normal(k, s, c.x_dtype)),
    "inv_rms": ("per_row", lambda k, s, c, e, sub, n, i, d: inv_rms(d["x"])),
}
_GROUPS = {
    "x": _PER_TOKEN["x"],
    "scale": _PER_TOKEN["scale"],  # x's row magnitudes
    "q": _PER_TOKEN["q"],
    "group_scale": (
        "row_groups",
        lambda k, s, c, e, sub, n, i, d: scales(k, (*_rows(s), s[-1] // GROUP_SIZE), jnp.float32, e),
    ),
}
_MATMUL = {
    "q": ("rows", lambda k, s, c, e, sub, n, i, d: matmul_values(k, s, c.fmt)),  # a [..., K]
    "scale": ("per_row", lambda k, s, c, e, sub, n, i, d: matmul_scales(k, _rows(s), e)),  # a_scale
    "b": ("whole", lambda k, s, c, e, sub, n, i, d: matmul_values(k, (s[-1], n), c.fmt)),  # [K, N]
    "b_scale": ("whole", lambda k, s, c, e, sub, n, i, d: matmul_scales(k, (n,))),
    "block_scale": (
        "row_groups",
        lambda k, s, c, e, sub, n, i, d: matmul_scales(k, (*_rows(s), s[-1] // BLOCK), e),
    ),  # one per 1 x 128 group of a
    "b_block_scale": ("whole", lambda k, s, c, e, sub, n, i, d: matmul_scales(k, (s[-1] // BLOCK, n // BLOCK))),
    "residual": ("rows", lambda k, s, c, e, sub, n, i, d: normal(k, (*_rows(s), n), c.x_dtype, 1e-2)),  # [..., N]
}
ROLES = {"per_token": _PER_TOKEN, "fused": _FUSED, "groups": _GROUPS, "matmul": _MATMUL}
LAYOUTS = {family: {role: layout for role, (layout, _) in roles.items()} for family, roles in ROLES.items()}


class Inputs(collections.abc.Mapping):
    """A family's operands for one shape and case, each drawn on first use (from its own key)."""

    def __init__(self, key, shape, case, edges, subnormals, family, n, integers):
        self._args = (tuple(shape), case, edges, subnormals, shape[-1] if n is None else n, integers)
        self._roles = ROLES[family]
        keys = jax.random.split(key, max(5, len(self._roles)))
        # the per-token family's keys in their historical order
        order = ("scale", "zero_point", "x", "q", "g") if family == "per_token" else tuple(self._roles)
        self._keys = dict(zip(order, keys))
        self._drawn = {}

    def __getitem__(self, role):
        if role not in self._drawn:
            if role not in self._roles:
                raise KeyError(role)
            self._drawn[role] = self._roles[role][1](self._keys[role], *self._args, self)
        return self._drawn[role]

    def __iter__(self):
        return iter(self._roles)

    def __len__(self):
        return len(self._roles)


def inputs(key, shape, case: Case, edges=True, subnormals=True, *, family="per_token", n=None, integers=False):
    """Every operand an op of the family may take, for one shape (x's, [..., D]; the matmul's a,
    [..., K], with b [K, n], n = K by default) and case, drawn on first use. integers: the fused
    family's integer-valued data (exact sums of squares)."""
    return Inputs(key, shape, case, edges, subnormals, family, n, integers)


# ---- the fused ops' derivative references: jax.grad of the jnp composition, straight-through --------


def _ste_dynamic(grid):
    def quantize(h):
        y = ref.fake_quantize_per_token_dynamic(h, **grid)
        s = ref.quantize_per_token_dynamic(h, **grid)[1]
        inside = ref.fake_quantize_per_token_grad(jnp.ones_like(h), h, s, **grid)
        return y, inside

    return quantize


def composed_norm(x, w, res, grid, eps=EPS):
    """rms_norm_fake_quantize_per_token (dynamic) as a float32 jnp composition whose jax.grad is
    the straight-through estimator's: (y, r)."""
    r = x + res if res is not None else x
    h = r * jax.lax.rsqrt(jnp.mean(r * r, -1, keepdims=True) + eps) * w
    y, inside = _ste_dynamic(grid)(jax.lax.stop_gradient(h))
    return jnp.where(inside != 0, h, jax.lax.stop_gradient(h)) + jax.lax.stop_gradient(y - h), r


def composed_silu(a, b, grid):
    """silu_mul_fake_quantize_per_token (dynamic) as a float32 jnp composition, straight-through."""
    h = jax.nn.silu(a) * b
    y, inside = _ste_dynamic(grid)(jax.lax.stop_gradient(h))
    return jnp.where(inside != 0, h, jax.lax.stop_gradient(h)) + jax.lax.stop_gradient(y - h)


def _passes(h, s, case):
    """The straight-through mask of h (in the data's dtype, as the kernels round it) at scale s."""
    return ref.fake_quantize_per_token_grad(jnp.ones_like(h), h, s, **case.kwargs()) != 0


def _norm_backward_reference(case):
    """(dx, dw) of the norm backward kernel: jax.vjp of the norm in float32 at g where h passes."""

    def call(g, r, w, s, inv, g_residual=None):  # inv: the kernel's; the reference recomputes it
        f32 = jnp.float32
        dh = jnp.where(_passes(ref.rms_norm(r, w)[0], s, case), g.astype(f32), 0)
        norm = lambda r, w: r * jax.lax.rsqrt(jnp.mean(r * r, -1, keepdims=True) + EPS) * w
        dr, dw = jax.vjp(norm, r.astype(f32), w.astype(f32))[1](dh)
        if g_residual is not None:
            dr = dr + g_residual.astype(f32)
        return dr.astype(r.dtype), dw.astype(w.dtype)

    return call


def _silu_backward_reference(case):
    """(da, db) of the SiLU-mul backward kernel: jax.vjp of silu(a) * b in float32 where h passes."""

    def call(g, a, b, s):
        f32 = jnp.float32
        dh = jnp.where(_passes(ref.silu_mul(a, b), s, case), g.astype(f32), 0)
        da, db = jax.vjp(lambda a, b: jax.nn.silu(a) * b, a.astype(f32), b.astype(f32))[1](dh)
        return da.astype(a.dtype), db.astype(b.dtype)

    return call


# ---- the table ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    operands: tuple[str, ...]  # roles: keys of `inputs` for the family
    ours: Callable[[Case], Callable]
    reference: Callable[[Case], Callable]
    bytes_per_element: Callable[[int, int], int]  # (x itemsize, q itemsize) -> bytes read + written
    dynamic: bool = False  # takes no scale: symmetric unless case.zero_point
    results: tuple[str, ...] = ()  # the results' names, in order
    family: str = "per_token"
    compare: str = "bits"  # "bits", "row_sum", "bounded", "close", "product": the module docstring
    x_dtypes: tuple = FLOATS  # the cases it takes: these data dtypes,
    formats: tuple = ALL_FORMATS  # these formats,
    zero_points: bool = True  # the integer formats' zero-point cases,
    sub_grids: bool = False  # and integer sub-grids (qmin, qmax)
    multiple: int = 1  # D (and a matmul's N) must be a multiple of it
    rtol: tuple[float, float] = (0.0, 0.0)  # "bounded": the scales', for float16/bfloat16 and float32 data
    exact_on_integers: bool = False  # "bounded": bit for bit on integer-valued data
    row_reduction: bool = False  # "bounded": h comes from a row sum (the norm)
    scales_from: str | None = None  # "bounded", fake-quantize: the row whose scales its rows have
    reduces_rows: bool = False  # a result reduces over every row (a sum, a column amax): token shards need a collective
    reference_on_cpu: bool = False  # the reference's numbers are the CPU's (XLA:GPU may contract an FMA)

    def args(self, inputs):
        return tuple(inputs[k] for k in self.operands)

    def inputs(self, key, shape, case, edges=True, subnormals=True, n=None, integers=False):
        return inputs(key, shape, case, edges, subnormals, family=self.family, n=n, integers=integers)

    @property
    def sums(self):
        """The second result is a per-row sum, equal to rounding (order differs)."""
        return self.compare == "row_sum"

    @property
    def layouts(self):
        """Each operand's layout against the rows ("rows", "per_row", "row_groups", "whole")."""
        return tuple(LAYOUTS[self.family][k] for k in self.operands)

    def takes(self, case: Case) -> bool:
        """Whether the op takes the case (a dynamic symmetric op needs a signed format)."""
        if case.x_dtype not in self.x_dtypes or case.fmt not in self.formats:
            return False
        if case.zero_point and not self.zero_points or case.grid is not None and not self.sub_grids:
            return False
        return not (self.dynamic and case.symmetric and case.fmt.lowest >= 0)

    def fits(self, shape, n=None) -> bool:
        """Whether the op takes the shape (x's; a matmul's a with b [K, n])."""
        n = shape[-1] if n is None else n
        return len(shape) >= 1 and shape[-1] % self.multiple == 0 and n % self.multiple == 0

    def nbytes(self, shape, case: Case, n=None) -> int:
        """The bytes the op must move for x's shape (each input read once, each output written once),
        per-row values at 8 bytes a row; a matmul's a, b, out (and residual) and its scales."""
        xb, qb = case.x_dtype.itemsize, case.fmt.dtype.itemsize
        rows = int(np.prod(shape[:-1]))
        if self.family != "matmul":
            return int(np.prod(shape)) * self.bytes_per_element(xb, qb) + rows * 8
        k = shape[-1]
        n = k if n is None else n
        return rows * k * qb + k * n * qb + rows * n * xb * (1 + ("residual" in self.operands)) + 4 * (rows + n)


def _grad_kernel(prim):
    """The backward primitive itself (jax.grad would add the forward pass)."""

    def make(case):
        qmin, qmax = case.qrange

        def call(g, x, s, zp=None):
            s = s.astype(_checks.math_dtype(x.dtype))
            return prim.bind(g, x, s, *(() if zp is None else (zp,)), qmin=qmin, qmax=qmax, dtype=case.fmt.dtype)

        return call

    return make


def _static(fn):
    return lambda case: lambda x, s, zp=None: fn(x, s, zp, **case.kwargs())


def _backward(fn):
    return lambda case: lambda g, x, s, zp=None: fn(g, x, s, zp, **case.kwargs())


def _dynamic(fn, **rule):
    return lambda case: lambda x: fn(x, dtype=case.fmt.dtype, symmetric=case.symmetric, **rule)


def _rows_and_columns(fn):
    return lambda case: lambda x: fn(x, dtype=case.fmt.dtype, pad_to=16)


def _dequantize(fn):
    return lambda case: lambda q, s, zp=None: fn(q, s, zp, dtype=case.x_dtype)


# fused: x, weight[, residual][, scale] -> the op with residual= and scale= keywords
def _norm(fn, residual, static):
    def make(case):
        def call(x, w, *rest):
            rest = list(rest)
            res = rest.pop(0) if residual else None
            return fn(x, w, residual=res, scale=rest.pop(0) if static else None, **case.kwargs())

        return call

    return make


def _silu(fn, static):
    return lambda case: lambda a, b, s=None: fn(a, b, scale=s if static else None, **case.kwargs())


def _norm_backward_kernel(case):
    qmin, qmax = case.qrange

    def call(g, r, w, s, inv, g_residual=None):
        more = () if g_residual is None else (g_residual,)
        dx, dw, _ = rms_norm_grad_p.bind(
            g, r, w, s, inv, *more, dtype=case.fmt.dtype, qmin=qmin, qmax=qmax, has_residual=bool(more)
        )
        return dx, dw  # the per-group partial sums of dw are the kernel's scratch

    return call


def _silu_backward_kernel(case):
    qmin, qmax = case.qrange
    return lambda g, a, b, s: silu_mul_grad_p.bind(g, a, b, s, dtype=case.fmt.dtype, qmin=qmin, qmax=qmax)


def _group(fn):
    return lambda case: lambda x: fn(x, GROUP_SIZE, dtype=case.fmt.dtype)


def _group_dequantize(fn):
    return lambda case: lambda q, s: fn(q, s, dtype=case.x_dtype)


def _matmul(fn):
    return lambda case: lambda a, sa, b, sb, residual=None: fn(a, sa, b, sb, out_dtype=case.x_dtype, residual=residual)


def _per_token_rows():
    static = dict(sub_grids=True)
    return [
        OpSpec(
            "quantize",
            ("x", "scale", "zero_point"),
            _static(bj.quantize_per_token),
            _static(ref.quantize_per_token),
            lambda xb, qb: xb + qb,
            **static,
            results=("q",),
        ),
        OpSpec(
            "dequantize",
            ("q", "scale", "zero_point"),
            _dequantize(bj.dequantize_per_token),
            _dequantize(ref.dequantize_per_token),
            lambda xb, qb: qb + xb,
            **static,
            results=("y",),
        ),
        OpSpec(
            "fake_quant",
            ("x", "scale", "zero_point"),
            _static(bj.fake_quantize_per_token),
            _static(ref.fake_quantize_per_token),
            lambda xb, qb: 2 * xb,
            **static,
            results=("y",),
        ),
        OpSpec(
            "ste_backward",
            ("g", "x", "scale", "zero_point"),
            _grad_kernel(fake_quantize_grad_p),
            _backward(ref.fake_quantize_per_token_grad),
            lambda xb, qb: 3 * xb,
            **static,
            results=("dx",),
        ),
        # dx and the per-row ds in one pass
        OpSpec(
            "lsq_backward",
            ("g", "x", "scale", "zero_point"),
            _grad_kernel(fake_quantize_lsq_grad_p),
            _backward(ref.fake_quantize_per_token_lsq_grad),
            lambda xb, qb: 3 * xb,
            compare="row_sum",
            **static,
            results=("dx", "ds"),
        ),
        OpSpec(
            "dynamic",
            ("x",),
            _dynamic(bj.quantize_per_token_dynamic),
            _dynamic(ref.quantize_per_token_dynamic),
            lambda xb, qb: xb + qb,
            dynamic=True,
            results=("q", "scale", "zero_point"),
        ),
        OpSpec(
            "fake_dynamic",
            ("x",),
            _dynamic(bj.fake_quantize_per_token_dynamic),
            _dynamic(ref.fake_quantize_per_token_dynamic),
            lambda xb, qb: 2 * xb,
            dynamic=True,
            results=("y",),
        ),
        # the scale floored (symmetric only)
        OpSpec(
            "dynamic_min_scale",
            ("x",),
            _dynamic(bj.quantize_per_token_dynamic, min_scale=MIN_SCALE),
            _dynamic(ref.quantize_per_token_dynamic, min_scale=MIN_SCALE),
            lambda xb, qb: xb + qb,
            dynamic=True,
            zero_points=False,
            results=("q", "scale", "zero_point"),
        ),
        OpSpec(
            "fake_dynamic_min_scale",
            ("x",),
            _dynamic(bj.fake_quantize_per_token_dynamic, min_scale=MIN_SCALE),
            _dynamic(ref.fake_quantize_per_token_dynamic, min_scale=MIN_SCALE),
            lambda xb, qb: 2 * xb,
            dynamic=True,
            zero_points=False,
            results=("y",),
        ),
        # x read twice, q and q_t written; q_t's tokens padded to a multiple of 16 (the float8 GEMM's)
        OpSpec(
            "rows_and_columns",
            ("x",),
            _rows_and_columns(bj.quantize_rows_and_columns),
            _rows_and_columns(ref.quantize_rows_and_columns),
            lambda xb, qb: 2 * xb + 2 * qb,
            dynamic=True,
            results=("q", "scale", "q_t", "scale_t"),
            x_dtypes=FUSED_FLOATS,
            formats=SIGNED_FORMATS,
            zero_points=False,
            reduces_rows=True,
        ),
    ]


def _fused_rows():
    fused = dict(family="fused", x_dtypes=FUSED_FLOATS, formats=SIGNED_FORMATS, zero_points=False)
    rows = []
    for fake in (False, True):
        for dynamic in (False, True):
            for residual in (False, True):
                name = f"norm_{'fake_' if fake else ''}{'dynamic' if dynamic else 'quant' if fake else 'quantize'}"
                name += "_res" if residual else ""
                # x (and the residual) read; q or y (and r) written
                moved = (lambda xb, qb: 2 * xb) if fake else (lambda xb, qb: xb + qb)
                if residual:
                    moved = (lambda m: lambda xb, qb: m(xb, qb) + 2 * xb)(moved)
                rows.append(
                    OpSpec(
                        name,
                        ("x", "weight") + ("residual",) * residual + ("scale",) * (not dynamic),
                        _norm(
                            bj.rms_norm_fake_quantize_per_token if fake else bj.rms_norm_quantize_per_token,
                            residual,
                            not dynamic,
                        ),
                        _norm(
                            ref.rms_norm_fake_quantize_per_token if fake else ref.rms_norm_quantize_per_token,
                            residual,
                            not dynamic,
                        ),
                        moved,
                        dynamic=dynamic,
                        compare="bounded",
                        rtol=(2e-2, 1e-5),
                        exact_on_integers=True,
                        row_reduction=True,
                        scales_from=(name.replace("fake_", "") if fake and dynamic else None),
                        results=(("y",) if fake else ("q", "scale")) + ("r",),
                        **fused,
                    )
                )
    for residual in (False, True):
        rows.append(
            OpSpec(
                "norm_backward" + "_res" * residual,
                ("g", "x", "weight", "scale", "inv_rms") + ("g_residual",) * residual,
                _norm_backward_kernel,
                _norm_backward_reference,
                lambda xb, qb, r=residual: (3 + r) * xb,
                compare="close",
                results=("dx", "dw"),
                reduces_rows=True,
                reference_on_cpu=True,
                **fused,
            )
        )
    for fake in (False, True):
        for dynamic in (False, True):
            name = f"silu_{'fake_' if fake else ''}{'dynamic' if dynamic else 'quant' if fake else 'quantize'}"
            rows.append(
                OpSpec(
                    name,
                    ("a", "b") + ("scale",) * (not dynamic),
                    _silu(bj.silu_mul_fake_quantize_per_token if fake else bj.silu_mul_quantize_per_token, not dynamic),
                    _silu(
                        ref.silu_mul_fake_quantize_per_token if fake else ref.silu_mul_quantize_per_token, not dynamic
                    ),
                    (lambda xb, qb: 3 * xb) if fake else (lambda xb, qb: 2 * xb + qb),
                    dynamic=dynamic,
                    compare="bounded",
                    rtol=(1e-2, 1e-6),
                    scales_from=("silu_dynamic" if fake and dynamic else None),
                    results=("y",) if fake else ("q", "scale"),
                    **fused,
                )
            )
    rows.append(
        OpSpec(
            "silu_backward",
            ("g", "a", "b", "scale"),
            _silu_backward_kernel,
            _silu_backward_reference,
            lambda xb, qb: 5 * xb,
            compare="close",
            reference_on_cpu=True,
            results=("da", "db"),
            **fused,
        )
    )
    return rows


def _group_rows():
    groups = dict(family="groups", formats=SIGNED_FORMATS, zero_points=False, multiple=GROUP_SIZE, dynamic=True)
    return [
        OpSpec(
            "group_quantize",
            ("x",),
            _group(bj.quantize_per_token_group),
            _group(ref.quantize_per_token_group),
            lambda xb, qb: xb + qb,
            **groups,
            results=("q", "scale"),
        ),
        OpSpec(
            "group_fake_quant",
            ("x",),
            _group(bj.fake_quantize_per_token_group),
            _group(ref.fake_quantize_per_token_group),
            lambda xb, qb: 2 * xb,
            **groups,
            results=("y",),
        ),
        OpSpec(
            "group_dequantize",
            ("q", "group_scale"),
            _group_dequantize(bj.dequantize_per_token_group),
            _group_dequantize(ref.dequantize_per_token_group),
            lambda xb, qb: qb + xb,
            **{**groups, "dynamic": False},
            results=("y",),
        ),
    ]


def _matmul_rows():
    matmul = dict(
        family="matmul",
        x_dtypes=FUSED_FLOATS,
        formats=MATMUL_FORMATS,
        zero_points=False,
        compare="product",
        reference_on_cpu=True,
    )
    # bytes per element of a [M, K] with N = K (b, read once, is not per element: `nbytes` counts it)
    return [
        OpSpec(
            "matmul",
            ("q", "scale", "b", "b_scale"),
            _matmul(bj.scaled_matmul),
            _matmul(ref.scaled_matmul),
            lambda xb, qb: qb + xb,
            **matmul,
            results=("out",),
        ),
        OpSpec(
            "matmul_residual",
            ("q", "scale", "b", "b_scale", "residual"),
            _matmul(bj.scaled_matmul),
            _matmul(ref.scaled_matmul),
            lambda xb, qb: qb + 2 * xb,
            **matmul,
            results=("out",),
        ),
        OpSpec(
            "matmul_blockwise",
            ("q", "block_scale", "b", "b_block_scale"),
            _matmul(bj.scaled_matmul),
            _matmul(ref.scaled_matmul),
            lambda xb, qb: qb + xb,
            multiple=BLOCK,
            **matmul,
            results=("out",),
        ),
    ]


SPECS = {s.name: s for s in [*_per_token_rows(), *_fused_rows(), *_group_rows(), *_matmul_rows()]}


def select(*families):
    """The rows of these families (all rows without any), in table order."""
    return [s for s in SPECS.values() if not families or s.family in families]
