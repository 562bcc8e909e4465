"""The CUDA backend's XLA FFI handlers (csrc/cuda, csrc/gemm), a compiled nanobind module built where nvcc is found."""

def registrations() -> dict[str, object]:
    """The CUDA targets: "baracuda_<name>" -> its handler as a PyCapsule, one per row of csrc/ffi/ops.def."""

def load_cublaslt(candidates: list[str]) -> int:
    """Loads libcublasLt from the first of `candidates` that opens (once); its version, or RuntimeError if none."""

def handler_calls() -> int:
    """How many times a CUDA handler has run; kernels replayed from a command buffer do not count."""
