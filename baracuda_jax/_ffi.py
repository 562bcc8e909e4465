"""Registers the compiled FFI handlers with XLA, under one name per op for both platforms."""

import functools
import glob
import os
import re
import warnings

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
    for _name, _target in _cuda.gemm_registrations().items():  # CUDA only: the CPU lowers to XLA's dot
        jax.ffi.register_ffi_target(_name, _target, platform="CUDA")
        jax.ffi.register_ffi_target_as_batch_partitionable(_name)


def _cublaslt_candidates():
    """libcublasLt from the nvidia-cublas wheel that jax[cuda12/13] installs (newest first), then
    by soname (LD_LIBRARY_PATH, the system's)."""
    paths = []
    try:
        import nvidia
        paths = [p for root in nvidia.__path__ for p in glob.glob(os.path.join(root, "*", "lib", "libcublasLt.so.*"))]
    except ImportError:
        pass
    major = lambda p: int(re.search(r"\.so\.(\d+)", p).group(1))
    return sorted(paths, key=major, reverse=True) + ["libcublasLt.so.13", "libcublasLt.so.12"]


@functools.cache
def cublaslt_version():
    """cuBLASLt's version (130100 for 13.1), loading it the first time a scaled matmul is lowered
    for a GPU; None, with a warning, when this install has no CUDA module or no cuBLASLt is found."""
    if _cuda is None:
        return None
    try:
        return _cuda.load_cublaslt(_cublaslt_candidates())
    except RuntimeError as err:
        warnings.warn(f"baracuda_jax: {err}; scaled_matmul runs as XLA's dot and a rescale", RuntimeWarning)
        return None


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
