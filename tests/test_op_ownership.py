"""Each op's folder owns the op: code outside fastvae/ops/<folder>/ names the
op, or anything of its folder, only where the registry declares the use
(``_registry.USES``, each with its reason).

A use is found in the source, not by importing it:
- Python (fastvae/, kernels/; not the op folders' tests): an import of
  something from the folder (``from .ops.<folder>.op import x``), or a name or
  a string in code (not in a comment or a docstring) that spells an op of the
  folder or the folder itself, alone or as part of a longer name
  (``_kernels("bernoulli_likelihood")``, ``sample_normal_double_backward``);
- C++ (csrc/ and the op folders' .h/.cpp): the folder's header included
  (``#include "kl_normal.h"``), or such a name in code.

The package's exports (fastvae/__init__.py), the list of the op folders'
files (fastvae/ops/__init__.py) and the registry, whose USES are the
declarations, name the ops by design and are not read.
A declaration that no code makes fails too, so the list stays exact."""
import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

from fastvae import _registry

from conftest import INTERPRET

pytestmark = pytest.mark.skipif(INTERPRET, reason="main-process test (reads the source)")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fastvae"
EXEMPT = {PACKAGE / "__init__.py", PACKAGE / "ops" / "__init__.py", PACKAGE / "_registry.py"}

# every name a folder answers to: the folder's own and its ops', longest first (so that
# "sample_normal_kl" is read as that op, not as sample_normal followed by "_kl")
_NAMES = sorted(((name, folder) for folder in _registry.FOLDERS
                 for name in {folder, *(op.name for op in _registry.folder_ops(folder))}),
                key=lambda item: -len(item[0]))
_PATTERN = re.compile("|".join(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])" for name, _ in _NAMES))
_FOLDER_OF_NAME = dict(_NAMES)


def _place(path: Path) -> tuple[str, str | None]:
    """(the place's name as USES spells it, the op folder it lies in or None):
    fastvae/objectives.py -> "objectives"; kernels/_common.py -> "kernels._common";
    fastvae/ops/sample_normal/op.py -> "ops.sample_normal.op"; csrc/torch_ops.h -> "csrc/torch_ops.h"."""
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "csrc":
        return rel.as_posix(), None
    if rel.parts[0] == "kernels":
        return f"kernels.{path.stem}", None
    parts = list(path.relative_to(PACKAGE).parts)
    folder = parts[1] if parts[0] == "ops" else None
    if path.suffix == ".py":
        parts[-1] = path.stem
        if parts[-1] == "__init__":
            parts.pop()
        return ".".join(parts), folder
    return "/".join(parts), folder


def _named(text: str) -> set[str]:
    """The folders that the names in ``text`` (one token) spell."""
    return {_FOLDER_OF_NAME[m.group(0)] for m in _PATTERN.finditer(text)}


def _python_uses(path: Path) -> set[str]:
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    found = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.NAME, tokenize.STRING) and token.start[0] not in docstrings:
            found |= _named(token.string)
    for node in ast.walk(tree):  # imports: the module path names the folder
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= _named(node.module.replace(".", " "))
        elif isinstance(node, ast.ImportFrom):  # from .. import sample_normal
            found |= {f for a in node.names for f in _named(a.name)}
    return found


_CPP_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_CPP_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\"[^\"\n]*\"")


def _cpp_uses(path: Path) -> set[str]:
    code = _CPP_COMMENT.sub(" ", path.read_text(encoding="utf-8"))
    found = set()
    for token in _CPP_TOKEN.findall(code):
        found |= _named(token.removesuffix('.h"').strip('"'))
    return found


def _sources() -> list[Path]:
    ops = sorted(p for p in PACKAGE.glob("ops/*/*.py") if not p.name.startswith("test_"))
    python = sorted(PACKAGE.glob("*.py")) + ops + sorted((ROOT / "kernels").glob("*.py"))
    cpp = sorted(p for pattern in ("csrc/*.h", "csrc/*.cpp", "fastvae/ops/*/*.h", "fastvae/ops/*/*.cpp")
                 for p in ROOT.glob(pattern))
    return [p for p in python + cpp if p not in EXEMPT]


def uses() -> dict[tuple[str, str], Path]:
    """{(place, op folder): its file} for every use of a folder outside it."""
    found = {}
    for path in _sources():
        place, own = _place(path)
        for folder in (_python_uses if path.suffix == ".py" else _cpp_uses)(path):
            if folder != own:
                found[(place, folder)] = path
    return found


def test_code_outside_an_op_folder_names_it_only_where_declared():
    found = uses()
    undeclared = sorted(set(found) - set(_registry.USES))
    assert undeclared == [], (
        "code outside an op's folder names the op: move the code into the folder, reach it through the "
        "registry, or declare the use in _registry.USES with why:\n" + "\n".join(map(str, undeclared)))
    unused = sorted(set(_registry.USES) - set(found))
    assert unused == [], "declared uses that no code makes (remove them from _registry.USES):\n" + "\n".join(
        map(str, unused))


def test_every_declaration_gives_its_reason():
    for (place, folder), why in _registry.USES.items():
        assert folder in _registry.FOLDERS, (place, folder)
        assert isinstance(why, str) and len(why.split()) >= 4, (place, folder, why)


@pytest.mark.parametrize("text, expected", [
    ("sample_normal_unchecked", {"sample_normal"}),
    ("sample_normal_kl", {"sample_normal_kl"}),
    ("_kernels(\"bernoulli_likelihood\")", {"bernoulli_likelihood"}),
    ("bernoulli_log_prob_forward", {"bernoulli_likelihood"}),
    ("fastvae.ops.kl_normal.op", {"kl_normal"}),
    ("sample_normals", set()),  # another word
    ("resample_normal", set()),
])
def test_the_scan_reads_names_as_meant(text, expected):
    assert _named(text) == expected
