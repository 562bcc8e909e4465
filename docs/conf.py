"""Sphinx configuration: the guides in MyST markdown, the API reference from the installed package's docstrings.

Build (warnings are errors, as CI builds it):

    pip install ".[docs]"
    python -m sphinx -W -b html docs docs/_build/html
"""

import glob
import os
import sys

# `python -m sphinx` puts the working directory first on sys.path. Run from the repository root, that is the
# source tree, whose package has no compiled modules (_cpu, _cuda) unless it was built in place: then autodoc
# reads the installed package instead.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not glob.glob(os.path.join(_ROOT, "baracuda_jax", "_cpu*.so")):  # (_cpu.pyi, the stub, is always there)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

from jax.typing import ArrayLike, DTypeLike  # noqa: E402
from sphinx.util.typing import stringify_annotation  # noqa: E402

import baracuda_jax  # noqa: E402

project = "baracuda_jax"
author = "the baracuda_jax authors"
copyright = "the baracuda_jax authors"
release = version = baracuda_jax.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

# Google-style docstrings (Args:, Returns:), in the order the source gives them, with defaults as written
# (`dtype=jnp.int8`, not the class jnp.int8 evaluates to).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autodoc_typehints = "signature"

# jax.typing's ArrayLike and DTypeLike are unions; autodoc would print their members in every signature.
_ALIASES = {
    stringify_annotation(alias, mode): f"~jax.typing.{name}"
    for name, alias in (("ArrayLike", ArrayLike), ("DTypeLike", DTypeLike))
    for mode in ("smart", "fully-qualified-except-typing")
}


def _short_aliases(app, what, name, obj, options, signature, return_annotation):
    for union, alias in _ALIASES.items():
        signature = signature and signature.replace(union, alias)
        return_annotation = return_annotation and return_annotation.replace(union, alias)
    return signature, return_annotation


def setup(app):
    app.connect("autodoc-process-signature", _short_aliases)


nitpicky = False
myst_heading_anchors = 3  # links such as numerics.md#float8-outputs

html_theme = "alabaster"
html_title = f"baracuda_jax {release}"
html_static_path = []
