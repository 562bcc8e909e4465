"""qwix providers on this package's kernels: a Flax model quantized with qwix's rules runs its matmuls here.

``PtqProvider`` and ``QtProvider`` subclass qwix's classes of the same names and take the same rules
(``qwix.QuantizationRule``, ``qwix.QtRule``). Inside the model they intercept ``jax.lax.dot_general``
and ``jnp.einsum`` (``jnp.dot`` too, for PTQ) as qwix's do, and run the cases below on our ops; every
other rule or op goes to qwix's own path, with a one-time :class:`FallbackWarning` that names the
module and why.

- PTQ, ``weight_qtype == act_qtype``, int8 or float8_e4m3fn, dynamic ``absmax`` scales: the weight is
  prepared once, when ``qwix.quantize_model`` runs the model, as a :class:`~baracuda_jax.QuantizedWeight`
  (stored ``[N, K]``, as the GPU kernels read it); each call quantizes the activations per token and
  runs :func:`~baracuda_jax.w8a8_matmul`. ``tile_size=128`` (float8): 1 x 128 groups of the
  activations (:func:`~baracuda_jax.quantize_per_token_group`), 128 x 128 blocks of the weight, the
  blockwise :func:`~baracuda_jax.scaled_matmul`.
- QT, the same forward formats: with ``bwd_qtype=float8_e4m3fn`` (and float8 forward) the product is
  :func:`~baracuda_jax.fp8_matmul` (``rowwise``, or ``blockwise`` with ``tile_size=128``), forward and
  both gradients in float8; with ``bwd_qtype=None`` the forward is the W8A8 product of the weight
  quantized that step and the backward the float one, as qwix computes it then.
- The product must be the plain ``[..., K] x [K, N]`` (``nnx.Linear``'s): the lhs's last axes
  contracted with the rhs's first, no batch axes, the rhs a param of the module. Several contracted
  or output axes are flattened into one K or N (a reshape).

The numbers differ from qwix's where the rules differ (docs/qwix.md): qwix's int8 grid maps amax to
127.5 where ours maps it to 127, and qwix computes scales and quotients in the activations' dtype
(bfloat16 in a bf16 model) where ours computes them in float32 with a reciprocal.
"""

import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from jax.typing import DTypeLike

# qwix's internals that a provider of its own needs (MaxText's subclass uses the same hooks): the
# param wrapper and its replacement in the module, the param lookup, the interception switch. The
# qwix extra pins the version they were read from.
from qwix._src import interception
from qwix._src.core import qarray
from qwix._src.providers import ptq
from qwix._src.utils import flax_util

from baracuda_jax import _checks
from baracuda_jax.fp8_training import fp8_matmul
from baracuda_jax.groups import quantize_per_token_group
from baracuda_jax.matmul import scaled_matmul
from baracuda_jax.w8a8 import w8a8_matmul
from baracuda_jax.weights import BLOCK, QuantizedWeight, quantize_weight

__all__ = ["FallbackWarning", "PtqProvider", "QtProvider", "quantize_params"]

_INT8, _FP8 = np.dtype(jnp.int8), np.dtype(jnp.float8_e4m3fn)
_FORMATS = (_INT8, _FP8)


class FallbackWarning(UserWarning):
    """A rule or op that this module's providers leave to qwix's own path (once per module and reason)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Prepared(qarray.HowToQuantize):
    """qwix's record of how a PTQ param is quantized, for one of our weights: qwix keeps it beside the
    param (``ptq.WithAux.how``), so that ``quantize_params`` prepares a float param tree without the
    model. ``shape`` and ``dtype`` are the weight's as the product reads it (``[K..., N...]``, after
    the module's dtype promotion); the prepared weight is that, flattened to ``[K, N]``."""

    shape: tuple[int, ...] = ()
    dtype: np.dtype = np.dtype(np.float32)
    contracted: int = 1
    block_size: int | None = None


def _prepare(w: jax.Array, how: _Prepared) -> QuantizedWeight:
    """w (the product's rhs, or the param it comes from) as the prepared [K, N] weight, quantized
    from the values the product reads: in the dtype the module promoted it to."""
    w = jnp.reshape(jnp.asarray(w).astype(how.dtype), (math.prod(how.shape[: how.contracted]), -1))
    return quantize_weight(w, dtype=how.qtype, block_size=how.block_size)


class _QArrayModule:
    """qwix's ``qarray`` module, as the PTQ provider and ``quantize_params`` call it (their
    ``_qarray_module`` hook), with ``quantize`` of one of our weights returning a QuantizedWeight."""

    def __getattr__(self, name):
        return getattr(qarray, name)

    @staticmethod
    def quantize(array, how):
        if isinstance(how, _Prepared):
            return _prepare(array, how)
        return qarray.quantize(array, how)


_QARRAY = _QArrayModule()


# ---- what we cover --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A covered product: ``contracted`` trailing lhs axes against as many leading rhs axes."""

    fmt: np.dtype
    block_size: int | None
    contracted: int
    out_dtype: np.dtype


def _format(qtype) -> np.dtype | None:
    try:
        return np.dtype(qtype)
    except TypeError:  # qwix's named formats ("nf4", "mxfp8", "int4"...)
        return None


def _name(qtype) -> str:
    fmt = _format(qtype)
    return repr(qtype) if fmt is None else fmt.name


def _rule_reason(rule, training: bool) -> str | None:
    """Why the rule's forward (and, training, backward) is not ours; None where it is."""
    fmt = _format(rule.weight_qtype)
    if rule.act_qtype is None:
        return "weight-only quantization (act_qtype None): our products quantize the activations too"
    if fmt not in _FORMATS or _format(rule.act_qtype) != fmt:
        return (
            f"weight_qtype {_name(rule.weight_qtype)} with act_qtype {_name(rule.act_qtype)}: ours takes both "
            f"int8 or both float8_e4m3fn"
        )
    if rule.act_static_scale:
        return "static activation scales (act_static_scale): ours are dynamic, one per token"
    for what in ("weight_calibration_method", "act_calibration_method", *(("bwd_calibration_method",) * training)):
        if getattr(rule, what) != "absmax":
            return f"{what}={getattr(rule, what)!r}: ours is 'absmax'"
    if rule.tile_size is not None:
        if rule.tile_size != BLOCK:
            return f"tile_size={rule.tile_size!r}: ours takes None (per channel) or {BLOCK}"
        if fmt != _FP8:
            return f"tile_size={BLOCK} with int8: blockwise scales run in float8 only (cuBLASLt's block-scaled GEMM)"
    if not training:
        return None
    if rule.bwd_qtype is not None:
        if _format(rule.bwd_qtype) != _FP8:
            return f"bwd_qtype {_name(rule.bwd_qtype)}: fp8_matmul's gradients are float8_e4m3fn"
        if fmt != _FP8:
            return "an int8 forward with a quantized backward: fp8_matmul trains in float8"
    extras = dict(
        bwd_weight_grad_tile_size=rule.bwd_weight_grad_tile_size,
        disable_channelwise_axes=rule.disable_channelwise_axes,
        bwd_stochastic_rounding=rule.bwd_stochastic_rounding,
        additional_qt_config=rule.additional_qt_config,
    )
    for what, value in extras.items():
        if value:
            return f"{what}={value!r}: not in our recipes"
    return None


def _contracted(dimension_numbers, lhs_shape, rhs_shape) -> int | str:
    """How many axes the product contracts, trailing in lhs and leading in rhs in the same order (the
    plain [..., K] x [K, N]); or why it is not that."""
    (lc, rc), (lb, rb) = dimension_numbers
    n = len(lc)
    if lb or rb:
        return f"dimension numbers {dimension_numbers}: batch axes"
    if not n or tuple(lc) != tuple(range(len(lhs_shape) - n, len(lhs_shape))) or tuple(rc) != tuple(range(n)):
        return f"dimension numbers {dimension_numbers}: ours contracts lhs's last axes with rhs's first"
    if len(rhs_shape) == n:
        return f"rhs {tuple(rhs_shape)} has no output axis"
    return n


def _plan(rule, lhs, rhs_shape, rhs_dtype, dimension_numbers, preferred_element_type, training) -> _Plan | str:
    """The covered product, or why the call is not covered."""
    reason = _rule_reason(rule, training)
    if reason:
        return reason
    n = _contracted(dimension_numbers, lhs.shape, rhs_shape)
    if isinstance(n, str):
        return n
    for name, dtype in (("lhs", lhs.dtype), ("rhs", rhs_dtype)):
        if np.dtype(dtype) not in _checks.FUSED_FLOAT_DTYPES:
            return f"{name} dtype {np.dtype(dtype).name}: ours takes float16, bfloat16 or float32"
    out = np.dtype(preferred_element_type or jnp.result_type(lhs.dtype, rhs_dtype))
    if out not in _checks.FUSED_FLOAT_DTYPES:
        return f"preferred_element_type {out.name}: ours returns float16, bfloat16 or float32"
    fmt, block = _format(rule.weight_qtype), rule.tile_size
    k, n_out = math.prod(rhs_shape[:n]), math.prod(rhs_shape[n:])
    if fmt == _INT8 and k > _checks.MATMUL_INT8_MAX_K:
        return f"int8 with K={k}: ours takes K <= {_checks.MATMUL_INT8_MAX_K}"
    if block and (n != 1 or k % BLOCK or n_out % BLOCK):
        return (
            f"tile_size={BLOCK} on rhs {tuple(rhs_shape)}: blocks need one contracted axis and K and N "
            f"multiples of {BLOCK}"
        )
    return _Plan(fmt, block, n, out)


def _einsum_dimension_numbers(spec: str, lhs_ndim: int, rhs_ndim: int):
    """The dot_general dimension numbers of a two-operand einsum whose output is lhs's free axes, then
    rhs's; or why it is not such an einsum."""
    inputs, arrow, out = spec.replace(" ", "").partition("->")
    parts = inputs.split(",")
    if not arrow or "." in spec or len(parts) != 2:
        return f"einsum {spec!r}: ours takes 'lhs,rhs->out' with explicit axes"
    a, b = parts
    if len(a) != lhs_ndim or len(b) != rhs_ndim or any(len(set(s)) != len(s) for s in (a, b, out)):
        return f"einsum {spec!r}: repeated or missing axes"
    contracted = [c for c in a if c in b and c not in out]
    if out != "".join(c for c in a if c not in contracted) + "".join(c for c in b if c not in contracted):
        return f"einsum {spec!r}: ours needs the output axes as lhs's free axes then rhs's (no batch axes)"
    lc, rc = tuple(a.index(c) for c in contracted), tuple(b.index(c) for c in contracted)
    return (lc, rc), ((), ())


def _flat(x, contracted):
    """x [..., K...] as [..., K] (its last `contracted` axes flattened)."""
    return x.reshape(*x.shape[: x.ndim - contracted], -1)


def _w8a8(x, w: QuantizedWeight, block_size, out_dtype):
    """x [..., K] quantized per token (or in 1 x 128 groups) in w's format, times w."""
    if block_size is None:
        return w8a8_matmul(x, w, out_dtype=out_dtype)
    q, s = quantize_per_token_group(x, block_size, dtype=w.dtype)
    return scaled_matmul(q, s, w, out_dtype=out_dtype)


class _Fallbacks:
    """The one-time warnings of a provider's fallbacks."""

    def __init__(self, provider: str):
        self.provider, self.seen = provider, set()

    def warn(self, op: str, reason: str) -> None:
        path = "/".join(map(str, flax_util.get_current_module_path()))
        if (path, op, reason) not in self.seen:
            self.seen.add((path, op, reason))
            warnings.warn(
                f"baracuda_jax.qwix.{self.provider}: {op} in module {path!r} runs on qwix's own path: {reason}",
                FallbackWarning,
                stacklevel=2,
            )


class _OursFirst:
    """The intercepted products of a provider: its ``_ours`` where covered, else its qwix base class's.

    Listed before the qwix class, so that ``super()`` here is qwix's provider.
    """

    def dot_general(
        self,
        lhs: jax.Array,
        rhs,
        dimension_numbers,
        precision=None,
        preferred_element_type: DTypeLike | None = None,
        *,
        out_sharding=None,
    ) -> jax.Array:
        """``jax.lax.dot_general`` in the model: ours where covered, else qwix's provider's."""
        out = self._ours("dot_general", lhs, rhs, dimension_numbers, preferred_element_type, out_sharding)
        if out is not None:
            return out
        return super().dot_general(
            lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding=out_sharding
        )

    def einsum(
        self,
        einsum_str: str,
        *operands,
        precision=None,
        preferred_element_type: DTypeLike | None = None,
        _dot_general=jax.lax.dot_general,
        out_sharding=None,
    ) -> jax.Array:
        """``jnp.einsum`` in the model: ours for a covered two-operand product, else qwix's provider's."""
        if len(operands) == 2:
            lhs, rhs = operands
            prepared = _prepared(rhs)
            dims = _einsum_dimension_numbers(einsum_str, lhs.ndim, len(prepared.shape if prepared else rhs.shape))
            out = self._ours("einsum", lhs, rhs, dims, preferred_element_type, out_sharding)
            if out is not None:
                return out
        return super().einsum(
            einsum_str,
            *operands,
            precision=precision,
            preferred_element_type=preferred_element_type,
            _dot_general=_dot_general,
            out_sharding=out_sharding,
        )


# ---- PTQ ------------------------------------------------------------------------------------------


class PtqProvider(_OursFirst, qwix.PtqProvider):
    """qwix's post-training quantization provider, its covered products on our W8A8 kernels.

    A drop-in for ``qwix.PtqProvider``: ``qwix.quantize_model(model, PtqProvider(rules), *inputs)``.
    Where a rule matches a product this module covers (docs/qwix.md lists them), the first call (the one
    ``quantize_model`` makes) replaces the module's weight with a prepared
    :class:`~baracuda_jax.QuantizedWeight` (in qwix's ``WithAux`` wrapper, so that the model's state,
    ``nnx.split`` and checkpoints carry it), and every call quantizes the activations per token
    and runs the scaled product. Other products run as ``qwix.PtqProvider`` runs them, each with a
    one-time :class:`FallbackWarning`.

    Args:
      rules: ``qwix.QuantizationRule`` s, in order of precedence, as qwix's provider takes them.
      disable_jit: as qwix's: run the intercepted methods without ``jax.jit``.
    """

    def __init__(self, rules: Sequence[qwix.QuantizationRule], *, disable_jit: bool = False):
        super().__init__(rules, disable_jit=disable_jit, _qarray_module=_QARRAY)
        self._fallbacks = _Fallbacks(type(self).__name__)

    def _ours(self, op, lhs, rhs, dims, preferred_element_type, out_sharding) -> jax.Array | None:
        """The product on our kernels, or None where qwix's path takes it (warned once if quantized)."""
        rule, _ = self._get_current_rule_and_op_id(op, only_rule=True)
        if rule is None or rule.weight_qtype is None:
            return None
        prepared = _prepared(rhs)
        shape, dtype = (prepared.shape, prepared.dtype) if prepared else (tuple(rhs.shape), np.dtype(rhs.dtype))
        name = None if isinstance(rhs, ptq.WithAux) else flax_util.find_param(rhs)
        if isinstance(dims, str):
            plan = dims
        elif out_sharding is not None:
            plan = "out_sharding given: ours leaves the output's sharding to the partitioner"
        elif not isinstance(rhs, ptq.WithAux) and not name:
            plan = "rhs is not a param of the module (an activation)"
        else:
            plan = _plan(rule, lhs, shape, dtype, dims, preferred_element_type, False)
            if isinstance(rhs, ptq.WithAux) and not prepared and not isinstance(plan, str):
                plan = "the weight was quantized by qwix's own provider"
        if isinstance(plan, str):
            if prepared:  # a prepared weight has no qwix path
                raise ValueError(f"baracuda_jax.qwix.PtqProvider: {op} on a prepared weight, not covered: {plan}")
            self._fallbacks.warn(op, plan)
            return None
        self._get_current_rule_and_op_id(op)  # counts the op, as qwix does for its op ids
        if prepared:
            w = rhs.array
        else:
            how = _Prepared(
                qtype=plan.fmt,
                channelwise_axes=tuple(range(plan.contracted, len(shape))),
                tiled_axes={plan.contracted - 1: plan.block_size} if plan.block_size else {},
                shape=shape,
                dtype=dtype,
                contracted=plan.contracted,
                block_size=plan.block_size,
            )
            w = ptq.create_quantized_param(name, rhs, how, _qarray_module=_QARRAY).array
        y = _w8a8(_flat(lhs, plan.contracted), w, plan.block_size, plan.out_dtype)
        return y.reshape(*lhs.shape[: lhs.ndim - plan.contracted], *shape[plan.contracted :])


def _prepared(rhs) -> _Prepared | None:
    """How rhs was prepared, where it is one of our weights."""
    return rhs.how if isinstance(rhs, ptq.WithAux) and isinstance(rhs.how, _Prepared) else None


def quantize_params(
    params: Any, abstract_quantized_params: Any, quant_stats: Any = None, *, allow_extra_params: bool = False
) -> Any:
    """``qwix.quantize_params`` for a model quantized by our :class:`PtqProvider`: a float param tree
    quantized without running the model, our weights prepared as :class:`~baracuda_jax.QuantizedWeight`.

    Args:
      params: the float params, as qwix takes them (NNX: ``nnx.to_pure_dict`` of the state).
      abstract_quantized_params: the quantized model (or its ``nnx.eval_shape``), which records how
        each param is quantized.
      quant_stats: qwix's quantization statistics (static-range rules, which fall back to qwix).
      allow_extra_params: as qwix's: ignore params the quantized model has no place for.

    Returns:
      The quantized param tree, as ``qwix.quantize_params`` returns it (NNX: for ``nnx.update``).
    """
    extra = {} if quant_stats is None else {"quant_stats": quant_stats}
    return qwix.quantize_params(
        params, abstract_quantized_params, allow_extra_params=allow_extra_params, _qarray_module=_QARRAY, **extra
    )


# ---- QT -------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _quantized_forward(x, w, params):
    """x [M, K] @ w [K, N] in W8A8 (w quantized this call), with the float product's gradients:
    qwix's QT with bwd_qtype None, whose backward takes the unquantized residuals."""
    fmt, block, out_dtype = params
    return _w8a8(x, quantize_weight(w, dtype=fmt, block_size=block), block, out_dtype)


def _quantized_forward_fwd(x, w, params):
    return _quantized_forward(x, w, params), (x, w)


# qwix disables its interceptions in its own custom_vjp for the same reason: under lax.scan the rule
# can be traced inside the model's call, where these dots would be intercepted again.
@interception.disable_interceptions
def _quantized_forward_bwd(params, residuals, g):
    x, w = residuals
    f32 = jnp.float32
    dx = jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())), preferred_element_type=f32)
    dw = jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())), preferred_element_type=f32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_quantized_forward.defvjp(_quantized_forward_fwd, _quantized_forward_bwd)


class QtProvider(_OursFirst, qwix.QtProvider):
    """qwix's quantized-training provider, its covered products through :func:`~baracuda_jax.fp8_matmul`
    and our W8A8 kernels.

    A drop-in for ``qwix.QtProvider``: ``qwix.quantize_model(model, QtProvider(rules), *inputs)``, then
    train the model as with qwix's. A covered ``QtRule`` (docs/qwix.md lists them) with
    ``bwd_qtype=jnp.float8_e4m3fn`` runs ``fp8_matmul`` (``rowwise``; ``blockwise`` with
    ``tile_size=128``): the forward and both gradients in float8. With ``bwd_qtype=None`` the forward
    is the W8A8 product (int8 or float8) and the backward the float one, as in qwix. Other products run
    as ``qwix.QtProvider`` runs them, each with a one-time :class:`FallbackWarning`.

    Args:
      rules: ``qwix.QtRule`` s (or ``qwix.QuantizationRule`` s), in order of precedence.
      disable_jit: as qwix's: run the intercepted methods without ``jax.jit``.
    """

    def __init__(self, rules: Sequence[qwix.QuantizationRule], *, disable_jit: bool = False):
        super().__init__(rules, disable_jit=disable_jit)
        self._fallbacks = _Fallbacks(type(self).__name__)

    def _ours(self, op, lhs, rhs, dims, preferred_element_type, out_sharding) -> jax.Array | None:
        """The product through our ops, or None where qwix's path takes it (warned once if quantized)."""
        rule, _ = self._get_current_rule_and_op_id(op, only_rule=True)
        if rule is None or rule.weight_qtype is None:
            return None
        if isinstance(dims, str):
            plan = dims
        elif out_sharding is not None:
            plan = "out_sharding given: ours leaves the output's sharding to the partitioner"
        elif not flax_util.find_param(rhs):
            plan = "rhs is not a param of the module (an activation)"
        elif flax_util.find_param(lhs):
            plan = "lhs is a param of the module too: ours is activations @ weight"
        else:
            plan = _plan(rule, lhs, rhs.shape, rhs.dtype, dims, preferred_element_type, True)
        if isinstance(plan, str):
            self._fallbacks.warn(op, plan)
            return None
        self._get_current_rule_and_op_id(op)  # counts the op, as qwix does for its op ids
        x, w = _flat(lhs, plan.contracted), rhs.reshape(math.prod(rhs.shape[: plan.contracted]), -1)
        if rule.bwd_qtype is not None:
            recipe = "blockwise" if plan.block_size else "rowwise"
            y = fp8_matmul(x, w, recipe=recipe, out_dtype=plan.out_dtype)
        else:
            lead = x.shape[:-1]
            y = _quantized_forward(x.reshape(-1, x.shape[-1]), w, (plan.fmt, plan.block_size, plan.out_dtype))
            y = y.reshape(*lead, -1)
        return y.reshape(*lhs.shape[: lhs.ndim - plan.contracted], *rhs.shape[plan.contracted :])
