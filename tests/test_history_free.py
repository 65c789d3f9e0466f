"""The code, tests, docs and benchmarks speak of the project only: no issue
numbers, no work periods of the people who wrote them, no paths outside the
repository. A comment says why the code is as it is; how it came to be
belongs in git and CHANGELOG.md (benchmarks/results/ keeps its raw logs).

The patterns are built from pieces, so that this file does not match them."""
import re
from pathlib import Path

import pytest

from conftest import INTERPRET

pytestmark = pytest.mark.skipif(INTERPRET, reason="main-process test (backend-independent)")

ROOT = Path(__file__).resolve().parent.parent

# every text file under these folders, at any depth
FOLDERS = ("fastvae", "kernels", "csrc", "tests", "docs", "examples")
SUFFIXES = {".py", ".h", ".hpp", ".cpp", ".cu", ".md", ".sh", ".txt", ".toml", ".cfg"}
# and these files of the top level, of benchmarks/ (not its results/) and the CI scripts
GLOBS = ("README.md", "setup.py", "pyproject.toml", "benchmarks/*.py", "benchmarks/*.sh",
         "benchmarks/README.md", ".ci/*")

FORBIDDEN = {
    "an issue number": re.compile(r"\b" + "iss" + r"ues?[ -]?#?\d", re.IGNORECASE),
    "a work period of the authors": re.compile(r"\b" + "ses" + r"sions?\b", re.IGNORECASE),
    "a path outside the repository": re.compile(re.escape("..") + "/" + "shared" + "|" + "/" + "work" + "/"),
}


def _files() -> list[Path]:
    found = {p for folder in FOLDERS for p in (ROOT / folder).rglob("*")
             if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts}
    found |= {p for pattern in GLOBS for p in ROOT.glob(pattern)}
    return sorted(found)


def _hits(text: str) -> list[tuple[int, str, str]]:
    return [(n, what, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            for what, pattern in FORBIDDEN.items() if pattern.search(line)]


def test_the_sources_speak_of_the_project_only():
    files = _files()
    assert ROOT / "README.md" in files and ROOT / "benchmarks" / "gpu_check.sh" in files
    assert ROOT / "fastvae" / "ops" / "kl_normal" / "kl_normal.cpp" in files
    hits = [f"{path.relative_to(ROOT)}:{n}: {what}: {line}" for path in files
            for n, what, line in _hits(path.read_text(encoding="utf-8", errors="replace"))]
    assert hits == [], "say why the code is as it is; history belongs in git and CHANGELOG.md:\n" + "\n".join(hits)


@pytest.mark.parametrize("line, expected", [
    ("# the fused bound (" + "iss" + "ue 33)", ["an issue number"]),
    ("\"\"\"" + "Iss" + "ue 25: a NaN", ["an issue number"]),
    ("### The " + "iss" + "ue-27 likelihoods", ["an issue number"]),
    ("0.70 last " + "ses" + "sion", ["a work period of the authors"]),
    ("a copy of " + ".." + "/shared/tools/gpu-probe", ["a path outside the repository"]),
    ("Conventions (see /" + "work/shared/guide/perf.md)", ["a path outside the repository"]),
    ("torch.compiler._compile_" + "ses" + "sion_context", []),  # a torch name, not the word
    ("the kernels issue it one sample ahead", []),
    ("tissue 3 of the model", []),
])
def test_the_patterns(line, expected):
    """Each pattern catches its forms and not the words that contain it."""
    assert [what for _, what, _ in _hits(line)] == expected
