"""Exporting functions that use the ops with `jax.export`.

`jax.export` refuses custom calls it does not know to be stable. Our targets keep their
names and signatures, so a function using them is exported by disabling that check for
these targets only:

    exp = baracuda_jax.export.export(jax.jit(f), platforms=("cpu", "cuda"))(x_spec)
    blob = exp.serialize()
    ...
    jax.export.deserialize(blob).call(x)   # needs `import baracuda_jax` (it registers the targets)
"""

from collections.abc import Callable, Sequence

import jax

from baracuda_jax import primitives

PLATFORMS = ("cpu", "cuda")  # the platforms whose kernels the package compiles

# every declared target, on every platform (an export for a GPU may be made on a CPU-only machine)
TARGETS = frozenset(primitives.target_of(d) for d in primitives.DECLARED.values())


def disabled_checks() -> list[jax.export.DisabledSafetyCheck]:
    """The safety checks to disable for our custom calls, and only for them."""
    return [jax.export.DisabledSafetyCheck.custom_call(name) for name in TARGETS]


def export(
    fun: Callable,
    *,
    platforms: Sequence[str] = ("cpu", "cuda"),
    disabled_checks_: Sequence[jax.export.DisabledSafetyCheck] = (),
    **kwargs,
) -> Callable[..., jax.export.Exported]:
    """:func:`jax.export.export` with our custom calls allowed.

    Args:
      fun: a ``jax.jit``-wrapped function.
      platforms: the platforms to export for: a sequence of ``"cpu"`` and ``"cuda"``.
      disabled_checks_: further safety checks to disable.
      **kwargs: passed on to :func:`jax.export.export`.

    Returns:
      A function that takes the arguments (or their shapes) and returns the ``jax.export.Exported``.
    """
    _check_platforms(platforms)
    return jax.export.export(
        fun, platforms=platforms, disabled_checks=[*disabled_checks(), *disabled_checks_], **kwargs
    )


def _check_platforms(platforms) -> None:
    if isinstance(platforms, str) or not isinstance(platforms, Sequence) or not platforms:
        raise TypeError(
            f"export: platforms must be a non-empty sequence of platform names, e.g. ('cpu', 'cuda') or "
            f"('cuda',); got {type(platforms).__name__} {platforms!r}"
        )
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown:
        raise ValueError(
            f"export: platforms has {', '.join(map(repr, unknown))}; the kernels are compiled for "
            f"{' and '.join(PLATFORMS)} only"
        )
