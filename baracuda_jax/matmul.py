"""The scaled low-precision matmul of W8A8 inference: per-token activation scales times per-channel
weight scales, applied to an int8 or float8 product; or blockwise scales (DeepSeek-V3's FP8 recipe:
1 x 128 groups of the activations, 128 x 128 blocks of the weights).

On a CUDA GPU it is one custom call (csrc/gemm/scaled_matmul.cu) whenever K is a multiple of 16: the
handler runs cuBLASLt (float8 with both scales in the GEMM's epilogue; int8 with an int32 product and
one rescaling pass) or our small-M kernel, by a fixed rule on (M, N, K), and the small-M kernel where
cuBLASLt cannot (N not a multiple of 16, no cuBLASLt or one too old). The choice is made where the
program runs, not where it is lowered, so an exported program keeps it. On the CPU, and for K not a
multiple of 16, it lowers to XLA's dot and a rescale: the jnp reference, `bj.reference.scaled_matmul`.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad, mlir
from jax.typing import ArrayLike, DTypeLike

from baracuda_jax import _checks, _ffi, reference
from baracuda_jax.primitives import (
    FACTORS,
    PER_COLUMN,
    PER_ROW,
    ROWS,
    OpDecl,
    batch_lift,
    define,
    like,
    lower_lifted,
    partition_attributes,
    static_shapes,
)
from baracuda_jax.weights import QuantizedWeight, check_leaves

_OP = "scaled_matmul"
WORKSPACE_BYTES = 32 << 20  # cuBLASLt's workspace, as XLA gives its own GEMMs on Hopper
_ALIGN = 16  # K: the GPU kernels read 16-byte pieces of a's and b's rows
_BLOCK_ROWS = 4  # blockwise: cuBLASLt reads a_scale as [K/128][rows], rows 16-byte aligned (measured: M % 4)
# the GPU kernel: the handler's rule ("auto"), or one forced (tests, benchmarks); blockwise is cuBLASLt's
ROUTES = ("auto", "cublaslt", "small_m")


def scaled_matmul(
    a: ArrayLike,
    a_scale: ArrayLike,
    b: ArrayLike | QuantizedWeight,
    b_scale: ArrayLike | None = None,
    *,
    out_dtype: DTypeLike = jnp.bfloat16,
    residual: ArrayLike | None = None,
) -> jax.Array:
    """The product of per-token quantized activations and per-channel quantized weights.

    ``out[..., n] = a_scale[...] * b_scale[n] * sum_k a[..., k] * b[k, n] (+ residual[..., n])``, the
    sum in float32 (float8) or int32 (int8, exact), then the scales (and the residual) in float32,
    rounded once to ``out_dtype``. With blockwise scales (``b_scale`` of rank 2) each block of 128
    along K is summed and scaled on its own, and the blocks' terms are added in float32:
    ``out[..., n] = sum_j a_scale[..., j] * b_scale[j, n // 128] * sum_{k in block j} a[..., k] b[k, n]``.

    An inference op with no derivative: train through the fake-quantize ops. vmap over a's leading
    dims is one call; a batched ``b`` runs once per batch element.

    Args:
      a: ``[..., K]`` int8 or float8_e4m3fn: the activations, e.g. :func:`quantize_per_token_dynamic`'s q.
        int8 takes K up to 131071, where no int32 sum of K products can wrap.
      a_scale: one per row of ``a`` (``a.shape[:-1]``) or a scalar; blockwise, one per 1 x 128 group,
        ``a.shape[:-1] + (K // 128,)`` (:func:`quantize_per_token_group`'s row-layout scale).
      b: a :class:`QuantizedWeight` (:func:`quantize_weight`), which holds its scale; or ``[K, N]`` in
        a's dtype. The GPU reads b as ``[N][K]`` (column-major): a ``QuantizedWeight`` is stored so,
        and so is ``w.T`` of a weight stored ``[N, K]``; a row-major ``[K, N]`` costs a transpose per
        call.
      b_scale: None with a ``QuantizedWeight``; with a plain ``b``, one per column of ``b`` (``[N]``) or
        a scalar; blockwise, one per 128 x 128 block, ``[K // 128, N // 128]`` (K and N multiples of 128).
      out_dtype: bfloat16, float16 or float32.
      residual: ``[..., N]`` in ``out_dtype``, added before the rounding (a skip connection in the same
        pass: the GEMM's epilogue on the GPU); None for none.

    Returns:
      ``[..., N]`` in ``out_dtype``.
    """
    return _scaled_matmul_on("auto", a, a_scale, b, b_scale, out_dtype=out_dtype, residual=residual)


# jitted, so that a QuantizedWeight's q.T is a layout of the GEMM's operand even in an eager call
@functools.partial(jax.jit, static_argnums=0, static_argnames="out_dtype")
def _scaled_matmul_on(route, a, a_scale, b, b_scale, *, out_dtype=jnp.bfloat16, residual=None):
    """scaled_matmul with the GPU kernel's route (ROUTES) given: "small_m" or "cublaslt" forces one."""
    b, b_scale = _weight_operands(b, b_scale)
    a, b = jnp.asarray(a), jnp.asarray(b)
    a_scale, b_scale = jnp.asarray(a_scale), jnp.asarray(b_scale)
    residual = () if residual is None else (jnp.asarray(residual),)
    out_dtype = _checks.matmul_operands(_OP, a, a_scale, b, b_scale, out_dtype, *residual)
    if not _checks.is_blockwise(b_scale):
        a_scale = jnp.broadcast_to(a_scale, a.shape[:-1])
        b_scale = jnp.broadcast_to(b_scale, b.shape[1:])
    return scaled_matmul_p.bind(
        a, a_scale.astype(jnp.float32), b, b_scale.astype(jnp.float32), *residual, out_dtype=out_dtype, route=route
    )


def _weight_operands(b, b_scale):
    """(b [K, N], b_scale): a QuantizedWeight's q [N, K] transposed (the GEMM reads b column-major,
    so XLA makes the transpose a layout) and its scale; a plain b with its b_scale as given."""
    if not isinstance(b, QuantizedWeight):
        if b_scale is None:
            raise TypeError(
                f"{_OP}: b_scale is None; a plain b needs its scales ([N], a scalar, or blockwise "
                f"[K // 128, N // 128]), or pass b as a QuantizedWeight (bj.quantize_weight)"
            )
        return b, b_scale
    if b_scale is not None:
        raise TypeError(f"{_OP}: b is a QuantizedWeight, which holds its scale; b_scale must be None")
    if b.q.ndim != 2:
        raise ValueError(
            f"{_OP}: b is a QuantizedWeight of shape {b.shape}, stacked layers; expected one layer's "
            f"[K, N] (index its leaves with jax.tree.map, or jax.lax.scan / jax.vmap over them)"
        )
    check_leaves(_OP, "b.", b.q, b.scale, b.block_size)
    return jnp.asarray(b.q).T, b.scale


def _abstract_eval(a, a_scale, b, b_scale, *residual, out_dtype, route):
    _checks.matmul_operands(_OP, a, a_scale, b, b_scale, out_dtype, *residual)
    for name, s in (("a_scale", a_scale), ("b_scale", b_scale)):
        if s.dtype != np.float32 or s.ndim == 0 and a.ndim > 1:
            raise TypeError(f"{_OP}: the primitive takes {name} as float32, one value per row, column or block")
    _check_route(route, _checks.is_blockwise(b_scale), *b.shape)
    return like(a, (*a.shape[:-1], b.shape[1]), out_dtype)


def _check_route(route, blockwise, k, n):
    if route not in ROUTES:
        raise ValueError(f"{_OP}: route is {route!r}; expected one of {ROUTES}")
    if route != "auto" and k % _ALIGN:  # such K lowers to XLA's dot: no kernel to force
        raise ValueError(f"{_OP}: route {route!r} needs K a multiple of {_ALIGN}; got K={k}")
    if blockwise and route == "small_m":
        raise ValueError(f"{_OP}: route 'small_m' takes per-channel scales; blockwise runs on cuBLASLt")
    if route == "cublaslt" and n % _ALIGN:
        raise ValueError(f"{_OP}: route 'cublaslt' needs N a multiple of {_ALIGN}; got N={n}")


def _reference_lowering(ctx, *operands, out_dtype, route):
    del route  # a GPU kernel's choice

    def composed(a, a_scale, b, b_scale, residual=None):
        return reference.scaled_matmul(a, a_scale, b, b_scale, out_dtype=out_dtype, residual=residual)

    return mlir.lower_fun(composed, multiple_results=False)(ctx, *operands)


def _cuda_lowering(ctx, *operands, out_dtype, route):
    a_aval, a_scale_aval, b_aval, b_scale_aval = ctx.avals_in[:4]
    k, n = b_aval.shape
    blockwise = _checks.is_blockwise(b_scale_aval)
    if not (
        static_shapes(ctx.avals_in)
        and k % _ALIGN == 0
        and k > 0
        and n > 0
        and math.prod(a_aval.shape[:-1]) > 0
        and not (blockwise and a_aval.dtype != jnp.float8_e4m3fn)
    ):  # int8 blocks: cuBLASLt has none
        return _reference_lowering(ctx, *operands, out_dtype=out_dtype, route=route)
    # Loads cuBLASLt into this process where a GPU will run the program, for the handler's large-M
    # and blockwise route; the program is the same without it (the handler then runs the small-M
    # kernel at every M), and a machine without a GPU (an export) neither loads nor warns.
    if _ffi.gpu_kernels_available():
        _ffi.cublaslt_version()
    params = {"out_dtype": out_dtype, "route": route}
    if blockwise and math.prod(a_aval.shape[:-1]) % _BLOCK_ROWS:
        padded = functools.partial(_rows_padded, **params)
        return mlir.lower_fun(padded, multiple_results=False)(ctx, *operands)
    # b [K, N] stays whole under XLA's batch partitioner only if a has more batch dims than b has dims
    lift = batch_lift(a_aval.ndim, [2])
    if lift:
        return lower_lifted(ctx, scaled_matmul_p, operands, params, lift, (True, True, False, False, True))
    out = ctx.avals_out[0]
    results = [out, like(out, (WORKSPACE_BYTES,), np.uint8)]
    if a_aval.dtype == np.int8:
        results.append(like(out, out.shape, np.int32))  # the int32 product before its scales
    # a's dims, N, the workspace's bytes, and the scale blocks along K and N
    *batch, kf, nf, wf, kbf, nbf = FACTORS[: a_aval.ndim + 4]
    scale_factors = [[*batch, kbf], [kbf, nbf]] if blockwise else [batch, [nf]]
    sizes = (
        *a_aval.shape,
        n,
        WORKSPACE_BYTES,
        *((k // _checks.MATMUL_BLOCK, n // _checks.MATMUL_BLOCK) if blockwise else ()),
    )
    attrs = partition_attributes(
        len(batch),
        [[*batch, kf], scale_factors[0], [kf, nf], scale_factors[1], [*batch, nf]][: len(operands)],
        [[*batch, nf], [wf], [*batch, nf]][: len(results)],
        dict(zip([*batch, kf, nf, wf, kbf, nbf], sizes)),
        [kf, nf, wf, *((kbf, nbf) if blockwise else ())],
    )
    # b column-major (stored [N][K]); blockwise, a_scale stored [K/128][rows] and b_scale [N/128][K/128]
    rank = a_scale_aval.ndim
    a_scale_layout = (*range(rank - 2, -1, -1), rank - 1) if blockwise else None
    layouts = [None, a_scale_layout, (0, 1), (0, 1) if blockwise else None, None][: len(operands)]
    rule = jax.ffi.ffi_lowering(f"baracuda_{_OP}", operand_layouts=layouts, extra_attributes=attrs)
    return rule(ctx.replace(avals_out=results), *operands, route=route)[:1]  # route: a string FFI attribute


def _rows_padded(a, a_scale, b, b_scale, *residual, out_dtype, route):
    """The blockwise call on a's rows flattened and padded to a multiple of _BLOCK_ROWS (the padding
    rows' outputs are dropped): cuBLASLt has no blockwise kernel for other row counts."""
    lead, m = a.shape[:-1], math.prod(a.shape[:-1])
    rows = lambda x: jnp.pad(x.reshape(m, x.shape[-1]), ((0, -m % _BLOCK_ROWS), (0, 0)))
    out = scaled_matmul_p.bind(
        rows(a), rows(a_scale), b, b_scale, *map(rows, residual), out_dtype=out_dtype, route=route
    )
    return out[:m].reshape(*lead, out.shape[-1])


def _no_derivative(primals, tangents, **params):
    raise TypeError(
        f"{_OP} is an inference op and has no derivative: train through fake_quantize_per_token* "
        f"(the straight-through estimator) and a float matmul"
    )


# vmap by the operands' roles: a batch axis of a, a_scale or the residual is more rows, one call; b
# and b_scale are never broadcast over rows, like a norm's per-column weight, and a batched one runs
# once per batch element. The target is CUDA's only: the CPU lowers to XLA's dot.
scaled_matmul_p = define(
    OpDecl(
        _OP,
        (ROWS, PER_ROW, PER_COLUMN, PER_COLUMN),
        (ROWS,),
        (),
        _abstract_eval,
        optional=(ROWS,),
        targets=("cuda",),
        lowerings={"cpu": _reference_lowering, "cuda": _cuda_lowering},
    )
)
ad.primitive_jvps[scaled_matmul_p] = _no_derivative
