"""Registers the compiled FFI handlers with XLA, under one name per op for both platforms."""

import functools
import glob
import os
import re
import warnings

import jax

from baracuda_jax import _cpu, _formats

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


# csrc/ffi/ops.def: the same name on every platform that has the op; the CUDA module also has the
# ops the CPU lowers to XLA's own code (the scaled matmul).
_formats.check_formats(_cpu.formats())
_TABLES = {"cpu": _cpu.registrations(), "cuda": {} if _cuda is None else _cuda.registrations()}
TARGETS = frozenset().union(*_TABLES.values())

for _platform, _table in _TABLES.items():
    for _name, _target in _table.items():
        jax.ffi.register_ffi_target(_name, _target, platform="CUDA" if _platform == "cuda" else "cpu")
        jax.ffi.register_ffi_target_as_batch_partitionable(_name)  # see primitives._partitioning_attributes


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
    for a GPU; None when this install has no CUDA module, and None with a warning when no cuBLASLt
    is found."""
    if _cuda is None:
        return None
    try:
        return _cuda.load_cublaslt(_cublaslt_candidates())
    except RuntimeError as err:
        message = f"baracuda_jax: {err}; scaled_matmul runs its small-M kernel at every M (blockwise scales fail)"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return None


def check_targets(declared: dict[str, set[str]]) -> None:
    """The primitives' targets (platform -> names) and the compiled op tables must name the same ops."""
    modules = {"cpu": "the CPU module", "cuda": "the CUDA module"}
    for platform, table in _TABLES.items():
        if platform == "cuda" and _cuda is None:
            continue
        want, registered = declared.get(platform, set()), set(table)
        if want != registered:
            raise ImportError(
                f"baracuda_jax: the primitives and {modules[platform]} disagree: declared but not "
                f"registered {sorted(want - registered)}, registered but not declared "
                f"{sorted(registered - want)}; rebuild the package"
            )
