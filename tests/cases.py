"""Seeds and shapes shared by the tests; the operands come from baracuda_jax.specs."""

import jax
import numpy as np

# Leading dims, odd D, D=1 and N=0 among them.
SHAPES = ((1,), (7,), (3, 1), (5, 8), (4, 33), (2, 3, 17), (2, 0, 9), (0, 4), (3, 4, 0), (16, 4097))


def rng():
    """A generator on a fresh seed, printed so that pytest shows it on failure."""
    seed = np.random.SeedSequence().entropy
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def key(r):
    """A jax.random key drawn from r."""
    return jax.random.key(int(r.integers(2**63)))
