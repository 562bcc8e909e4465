"""Op specs shared by the tests and the benchmarks (in the spirit of tokamax's arg_specs).

For each op: its operands, ours and the jnp reference as functions of those operands, and the
bytes it must move. `inputs` draws every operand for a shape and a `Case` (x dtype, output format,
zero point or not) on the device, with fresh random data: values spread over the whole grid and
past it, exact ties of the format's rounding, and (for tests) NaN, +-inf, zeros and subnormals.
The tests run every spec over the dtype matrix against its reference; the benchmarks time the same
functions on large shapes.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import baracuda_jax as bj
from baracuda_jax import _checks
from baracuda_jax import reference as ref
from baracuda_jax._formats import FORMATS, Format
from baracuda_jax.ops import fake_quantize_grad_p, fake_quantize_lsq_grad_p

FLOATS = tuple(np.dtype(t) for t in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))


@dataclasses.dataclass(frozen=True)
class Case:
    x_dtype: np.dtype
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


def case(x_dtype, q_dtype, zero_point=False):
    return Case(np.dtype(x_dtype), FORMATS[np.dtype(q_dtype)], zero_point)


ALL_FORMATS = tuple(FORMATS.values())


def cases(x_dtypes=FLOATS, formats=ALL_FORMATS):
    """The dtype matrix: every float x, every format, symmetric and (integer formats) with a zero point."""
    return [
        Case(np.dtype(x), f, zp)
        for x in x_dtypes
        for f in formats
        for zp in ((False, True) if not f.is_float else (False,))
    ]


# ---- operands ----------------------------------------------------------------------------------


def _f8_ties(key, shape, fmt):
    """Midpoints between neighbouring finite values of a float8 format (exact ties of its rounding)."""
    codes = jax.random.randint(key, shape, 0, 0x7F).astype(jnp.uint8)
    lo = jax.lax.bitcast_convert_type(codes, fmt.dtype).astype(jnp.float32)
    hi = jax.lax.bitcast_convert_type(codes + 1, fmt.dtype).astype(jnp.float32)
    return jnp.where(jnp.isfinite(hi), (lo + hi) / 2, lo)


def grid_values(key, shape, fmt: Format):
    """Values v = x/scale across the format's grid and past it, 30 % of them exact ties."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    sign = jnp.where(jax.random.bernoulli(k1, 0.5, shape), -1.0, 1.0)
    is_tie = jax.random.bernoulli(k2, 0.3, shape)
    if not fmt.is_float:
        v = jax.random.uniform(k3, shape, jnp.float32, -300, 300)
        return jnp.where(is_tie, jnp.round(v) + 0.5, v)
    tiny = float(jnp.finfo(fmt.dtype).smallest_subnormal)
    log2 = jax.random.uniform(k3, shape, jnp.float32, np.log2(tiny / 4), np.log2(1.2 * fmt.max))
    return sign * jnp.where(is_tie, _f8_ties(k4, shape, fmt), jnp.exp2(log2))


def scales(key, rows, dtype=jnp.float32, edges=True):
    """Positive scales, half of them powers of two (so that x * inv keeps exact ties); with edges,
    a few rows get 0, inf, NaN and a negative scale."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    s = jnp.where(
        jax.random.bernoulli(k1, 0.5, rows),
        jnp.exp2(jax.random.randint(k2, rows, -8, 3).astype(jnp.float32)),
        jax.random.uniform(k3, rows, jnp.float32, 1e-3, 4.0),
    )
    n = int(np.prod(rows))
    if edges and n >= 6:
        idx = jax.random.choice(k4, n, (4,), replace=False)
        s = s.reshape(-1).at[idx].set(jnp.array([0.0, np.inf, np.nan, -0.5], jnp.float32)).reshape(rows)
    return s.astype(dtype)


def zero_points(key, rows, qmin, qmax, edges=True):
    """Zero points on the grid; with edges, two rows get one outside it (still defined: clamped)."""
    k1, k2 = jax.random.split(key)
    zp = jax.random.randint(k1, rows, qmin, qmax + 1)
    n = int(np.prod(rows))
    if edges and n >= 4:
        idx = jax.random.choice(k2, n, (2,), replace=False)
        zp = zp.reshape(-1).at[idx].set(jnp.array([qmax + 40, qmin - 40])).reshape(rows)
    return zp.astype(jnp.int32)


def activations(key, shape, case: Case, scale, edges=True, subnormals=True):
    """x = v * scale with v from grid_values; with edges, NaN, +-inf, +-0, tiny and huge values.

    XLA:CPU computes with subnormals flushed to zero while the kernels (and XLA:GPU) keep them, so
    comparisons against the jnp reference on CPU pass subnormals=False."""
    k1, k2 = jax.random.split(key)
    s = jnp.asarray(scale, jnp.float32)
    s = jnp.where(jnp.isfinite(s) & (s != 0), s, 1.0)[..., None]
    x = (grid_values(k1, shape, case.fmt) * s).astype(case.x_dtype)
    if edges and x.size >= 16:
        tiny = [1e-40, -3e-39] if subnormals else [1e-3, -2e-3]
        special = jnp.array([np.nan, np.inf, -np.inf, 0.0, -0.0, *tiny, 1e30], jnp.float64).astype(case.x_dtype)
        idx = jax.random.choice(k2, x.size, (special.size,), replace=False)
        x = x.reshape(-1).at[idx].set(special).reshape(shape)
    return x


def quantized(key, shape, fmt: Format):
    """Every stored value of the format, uniformly (float8: every bit pattern but NaN)."""
    if fmt.is_float:
        codes = jax.random.randint(key, shape, 0, 256).astype(jnp.uint8)
        q = jax.lax.bitcast_convert_type(codes, fmt.dtype)
        return jnp.where(jnp.isnan(q.astype(jnp.float32)), jnp.zeros((), fmt.dtype), q)
    return jax.random.randint(key, shape, fmt.lowest, fmt.max + 1).astype(fmt.dtype)


def inputs(key, shape, case: Case, edges=True, subnormals=True):
    """Every operand an op of the table may take, for one shape and case."""
    rows = shape[:-1]
    ks, kz, kx, kq, kg = jax.random.split(key, 5)
    qmin, qmax = case.grid or (case.fmt.lowest, case.fmt.max)
    scale = scales(ks, rows, jnp.float32, edges)
    return dict(
        x=activations(kx, shape, case, scale, edges, subnormals),
        scale=scale,
        zero_point=zero_points(kz, rows, qmin, qmax, edges) if case.zero_point else None,
        q=quantized(kq, shape, case.fmt),
        g=jax.random.normal(kg, shape, case.x_dtype),
    )


# ---- the table ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    operands: tuple[str, ...]  # keys of `inputs`
    ours: Callable[[Case], Callable]
    reference: Callable[[Case], Callable]
    bytes_per_element: Callable[[int, int], int]  # (x itemsize, q itemsize) -> bytes read + written
    dynamic: bool = False  # takes no scale: symmetric unless case.zero_point
    sums: bool = False  # the second result is a per-row sum, equal to rounding (order differs)

    def args(self, inputs):
        return tuple(inputs[k] for k in self.operands)


def _grad_kernel(prim):
    """The backward primitive itself (jax.grad would add the forward pass)."""

    def make(case):
        qmin, qmax = case.grid or (case.fmt.lowest, case.fmt.max)

        def call(g, x, s, zp=None):
            s = s.astype(_checks.math_dtype(x.dtype))
            return prim.bind(g, x, s, *(() if zp is None else (zp,)), qmin=qmin, qmax=qmax, dtype=case.fmt.dtype)

        return call

    return make


def _static(fn):
    return lambda case: lambda x, s, zp=None: fn(x, s, zp, **case.kwargs())


def _backward(fn):
    return lambda case: lambda g, x, s, zp=None: fn(g, x, s, zp, **case.kwargs())


def _dynamic(fn):
    return lambda case: lambda x: fn(x, dtype=case.fmt.dtype, symmetric=case.symmetric)


def _dequantize(fn):
    return lambda case: lambda q, s, zp=None: fn(q, s, zp, dtype=case.x_dtype)


SPECS = {
    s.name: s
    for s in [
        OpSpec(
            "quantize",
            ("x", "scale", "zero_point"),
            _static(bj.quantize_per_token),
            _static(ref.quantize_per_token),
            lambda xb, qb: xb + qb,
        ),
        OpSpec(
            "dequantize",
            ("q", "scale", "zero_point"),
            _dequantize(bj.dequantize_per_token),
            _dequantize(ref.dequantize_per_token),
            lambda xb, qb: qb + xb,
        ),
        OpSpec(
            "fake_quant",
            ("x", "scale", "zero_point"),
            _static(bj.fake_quantize_per_token),
            _static(ref.fake_quantize_per_token),
            lambda xb, qb: 2 * xb,
        ),
        OpSpec(
            "ste_backward",
            ("g", "x", "scale", "zero_point"),
            _grad_kernel(fake_quantize_grad_p),
            _backward(ref.fake_quantize_per_token_grad),
            lambda xb, qb: 3 * xb,
        ),
        # dx and the per-row ds in one pass
        OpSpec(
            "lsq_backward",
            ("g", "x", "scale", "zero_point"),
            _grad_kernel(fake_quantize_lsq_grad_p),
            _backward(ref.fake_quantize_per_token_lsq_grad),
            lambda xb, qb: 3 * xb,
            sums=True,
        ),
        OpSpec(
            "dynamic",
            ("x",),
            _dynamic(bj.quantize_per_token_dynamic),
            _dynamic(ref.quantize_per_token_dynamic),
            lambda xb, qb: xb + qb,
            dynamic=True,
        ),
        OpSpec(
            "fake_dynamic",
            ("x",),
            _dynamic(bj.fake_quantize_per_token_dynamic),
            _dynamic(ref.fake_quantize_per_token_dynamic),
            lambda xb, qb: 2 * xb,
            dynamic=True,
        ),
    ]
}
