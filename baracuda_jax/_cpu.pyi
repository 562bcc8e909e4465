"""The CPU backend's XLA FFI handlers (csrc/cpu), a compiled nanobind module."""

def registrations() -> dict[str, object]:
    """The CPU targets: "baracuda_<name>" -> its handler as a PyCapsule, one per BJ_OP row of csrc/ffi/ops.def."""

def formats() -> list[tuple[str, bool, int, int]]:
    """The output formats of csrc/contract/formats.h: (name, is_float, lowest, max) each."""
