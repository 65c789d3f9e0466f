"""Sphinx configuration of the API reference: one entry per name in fastvae.__all__,
each with its signature and docstring (.ci/docs builds it with warnings as errors)."""
import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import fastvae  # noqa: E402

project = "fastvae"
extensions = ["sphinx.ext.autodoc"]
autodoc_member_order = "bysource"
html_theme = "alabaster"
exclude_patterns = ["_build"]


def _entries() -> str:
    """The reference's body, from fastvae.__all__: a name added there has its entry
    without a hand-kept list to update."""
    out = [".. currentmodule:: fastvae", ""]
    for name in fastvae.__all__:
        obj = getattr(fastvae, name)
        if inspect.ismodule(obj):
            out += [f".. automodule:: fastvae.{name}", "   :members:", "", ".. currentmodule:: fastvae", ""]
        elif isinstance(obj, type):
            out += [f".. autoclass:: {name}", "   :members:", ""]
        else:
            out += [f".. autofunction:: {name}", ""]
    # the adapters, outside fastvae.__all__: each imports its framework only when called
    out += [".. automodule:: fastvae.integrations.pyro", "   :members: log_likelihood", ""]
    return "\n".join(out)


def _append_entries(app, docname, source):
    if docname == "index":
        source[0] += "\n" + _entries() + "\n"


def _verbatim(app, what, name, obj, options, lines):
    """fastvae's docstrings are plain text (shapes, formulas, a*b), not reStructuredText:
    shown as written, in a literal block, they read as they do in help()."""
    if lines:
        lines[:] = ["::", ""] + ["    " + line for line in lines] + [""]


def setup(app):
    app.connect("source-read", _append_entries)
    app.connect("autodoc-process-docstring", _verbatim)
