"""Registers the compiled FFI handlers with XLA, under one name per op for both platforms."""

import jax

from baracuda_jax import _cpu

try:  # built only where nvcc was found; links cudart statically, so it imports without CUDA
    from baracuda_jax import _cuda
except ImportError:
    _cuda = None

HAS_CUDA_KERNELS = _cuda is not None  # compiled into this install; see gpu_kernels_available()


def gpu_kernels_available() -> bool:
    """Whether the CUDA kernels will run here: compiled into this install, and JAX sees a CUDA GPU."""
    if _cuda is None:
        return False
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:  # no CUDA backend (no plugin, no GPU or no driver)
        return False
TARGETS = frozenset(_cpu.registrations())  # csrc/ops.def: the same names on every platform

for _name, _target in _cpu.registrations().items():
    jax.ffi.register_ffi_target(_name, _target, platform="cpu")
    jax.ffi.register_ffi_target_as_batch_partitionable(_name)  # see primitives._partitioning_attributes
if _cuda is not None:
    for _name, _target in _cuda.registrations().items():
        jax.ffi.register_ffi_target(_name, _target, platform="CUDA")


def check_targets(declared: set) -> None:
    """The primitives' targets and the compiled op table must name the same ops."""
    tables = {"the CPU module": TARGETS}
    if _cuda is not None:
        tables["the CUDA module"] = frozenset(_cuda.registrations())
    for module, registered in tables.items():
        if declared != registered:
            raise ImportError(f"baracuda_jax: the primitives and {module} disagree: declared but not registered "
                              f"{sorted(declared - registered)}, registered but not declared "
                              f"{sorted(registered - declared)}; rebuild the package")
