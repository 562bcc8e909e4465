"""The output formats, mirroring csrc/contract/formats.h: dtype -> kind and range.

An integer format has a grid [qmin, qmax] inside its type's range, chosen per call, and may take a
zero point. A float8 format has the fixed grid [-fmax, fmax] (values beyond saturate) and no zero
point. A new output dtype is one entry here, one struct in formats.h (the two tables are checked
against each other at import), and its branch in reference.py where it rounds differently from these
two kinds.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Format:
    dtype: np.dtype
    is_float: bool
    lowest: int  # integer: the type's min; float8: -fmax
    max: int  # integer: the type's max; float8: fmax

    @property
    def name(self) -> str:
        return self.dtype.name


def _integer(t):
    info = np.iinfo(t)
    return Format(np.dtype(t), False, int(info.min), int(info.max))


def _float8(t):
    fmax = int(jnp.finfo(t).max)
    return Format(np.dtype(t), True, -fmax, fmax)


FORMATS = {
    f.dtype: f for f in (_integer(jnp.int8), _integer(jnp.uint8), _float8(jnp.float8_e4m3fn), _float8(jnp.float8_e5m2))
}


def check_formats(compiled: list[tuple[str, bool, int, int]]) -> None:
    """This table and the compiled one (csrc/contract/formats.h) must list the same formats."""
    ours = sorted((f.name, f.is_float, f.lowest, f.max) for f in FORMATS.values())
    if ours != sorted(tuple(f) for f in compiled):
        raise ImportError(
            f"baracuda_jax: _formats.py and csrc/contract/formats.h disagree: {ours} against "
            f"{sorted(compiled)}; rebuild the package"
        )
