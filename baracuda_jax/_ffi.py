"""Registers the compiled FFI handlers with XLA, under one name per op for both platforms."""

import jax

from baracuda_jax import _cpu

try:  # built only where nvcc was found; links cudart statically, so it imports without CUDA
    from baracuda_jax import _cuda
except ImportError:
    _cuda = None

HAS_CUDA_KERNELS = _cuda is not None
TARGETS = tuple(_cpu.registrations())  # the same names on every platform

for _name, _target in _cpu.registrations().items():
    jax.ffi.register_ffi_target(_name, _target, platform="cpu")
    jax.ffi.register_ffi_target_as_batch_partitionable(_name)  # see primitives._partitioning_attributes
if _cuda is not None:
    for _name, _target in _cuda.registrations().items():
        jax.ffi.register_ffi_target(_name, _target, platform="CUDA")
