"""Per-token (per-row) and per-token-group int8/uint8 and float8 quantization for JAX, as XLA FFI custom
calls on CPU and CUDA, and the scaled 8-bit matmul that consumes it, with its prepared weights."""

from baracuda_jax import reference
from baracuda_jax._ffi import HAS_CUDA_KERNELS, gpu_kernels_available
from baracuda_jax.fp8_training import fp8_matmul
from baracuda_jax.fused import (
    rms_norm_fake_quantize_per_token,
    rms_norm_quantize_per_token,
    silu_mul_fake_quantize_per_token,
    silu_mul_quantize_per_token,
)
from baracuda_jax.groups import dequantize_per_token_group, fake_quantize_per_token_group, quantize_per_token_group
from baracuda_jax.matmul import scaled_matmul
from baracuda_jax.ops import (
    VLLM_FP8_MIN_SCALE,
    dequantize_per_token,
    fake_quantize_per_token,
    fake_quantize_per_token_dynamic,
    quantize_per_token,
    quantize_per_token_dynamic,
)
from baracuda_jax.primitives import check_targets
from baracuda_jax.transposed import quantize_rows_and_columns
from baracuda_jax.w8a8 import rms_norm_w8a8_matmul, silu_mul_w8a8_matmul, w8a8_matmul
from baracuda_jax.weights import QuantizedWeight, quantize_weight

check_targets()  # every family is declared by now: the declarations against the compiled op tables
del check_targets

__all__ = [
    "HAS_CUDA_KERNELS",
    "QuantizedWeight",
    "VLLM_FP8_MIN_SCALE",
    "dequantize_per_token",
    "dequantize_per_token_group",
    "fake_quantize_per_token",
    "fake_quantize_per_token_dynamic",
    "fake_quantize_per_token_group",
    "fp8_matmul",
    "gpu_kernels_available",
    "quantize_per_token",
    "quantize_per_token_dynamic",
    "quantize_per_token_group",
    "quantize_rows_and_columns",
    "quantize_weight",
    "reference",
    "rms_norm_fake_quantize_per_token",
    "rms_norm_quantize_per_token",
    "rms_norm_w8a8_matmul",
    "scaled_matmul",
    "silu_mul_fake_quantize_per_token",
    "silu_mul_quantize_per_token",
    "silu_mul_w8a8_matmul",
    "w8a8_matmul",
]
__version__ = "0.1.0"
