"""The code blocks of the README and of docs/from-torch-distributions.md run as written."""
import re
from pathlib import Path

import pytest

from conftest import INTERPRET

PAGE = Path(__file__).resolve().parents[1] / "docs" / "from-torch-distributions.md"


@pytest.mark.skipif(INTERPRET, reason="main-process test (backend-independent)")
def test_from_torch_distributions_page_runs():
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)  # noqa: S102 (the page's own examples)


# What the README's snippets take as given: a model and data of the user's.
_README_PRELUDE = """
import torch
from torch import nn
torch.manual_seed(0)
x = (torch.rand(16, 64) > 0.5).float()
encoder = nn.Linear(64, 2 * 4)
decoder = nn.Linear(4, 64)
def encode(x):
    return encoder(x).chunk(2, dim=-1)
decode = decoder
test_loader = [x[:8], x[8:]]
"""


@pytest.mark.skipif(INTERPRET, reason="main-process test (backend-independent)")
def test_readme_code_blocks_run():
    readme = PAGE.parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    exec(_README_PRELUDE, namespace)  # noqa: S102
    for block in blocks:
        exec(compile(block, str(readme), "exec"), namespace)  # noqa: S102 (the README's own examples)
    assert namespace["ll"].shape == (16,) and namespace["res"].n_examples == 16
    assert namespace["stats"].pareto_k.shape == (16,) and namespace["terms"].bound.dim() == 0


def test_ci_runs_the_readmes_test_command_in_a_fresh_venv():
    """CI on a clean machine: .ci/run runs the README's test command
    word for word, inside a venv it makes itself, and .ci/sanitize installs the
    build requirements its own setup.py call needs."""
    root = PAGE.parents[1]
    readme = (root / "README.md").read_text()
    (command,) = re.findall(r"^# the tests.*\n(.+)$", readme, re.M)
    run = (root / ".ci" / "run").read_text()
    assert command.strip() in run.splitlines()
    assert run.index("python -m venv") < run.index("source") < run.index(command.strip())
    sanitize = (root / ".ci" / "sanitize").read_text()
    assert sanitize.index('["build-system"]["requires"]') < sanitize.index("setup.py build_ext")


def test_every_op_is_exported_and_listed():
    """Adding an op (docs/architecture.md) exports it in fastvae/__init__.py: every
    registry op is in __all__, importable, and in the module docstring's list."""
    import fastvae
    from fastvae import _registry

    for name in _registry.OPS:
        assert name in fastvae.__all__, name
        assert callable(getattr(fastvae, name)), name
        assert re.search(rf"(^-? *|, ){name}\(", fastvae.__doc__, re.M), f"{name} missing from fastvae's docstring"
    assert all(hasattr(fastvae, name) for name in fastvae.__all__)


def test_version_is_the_installed_distributions():
    """fastvae.__version__ is the package metadata's version (pyproject.toml's
    once installed), and a PEP 440 fallback when the metadata is missing."""
    import importlib.metadata
    from unittest import mock

    import fastvae

    assert fastvae.__version__ == importlib.metadata.version("fastvae")
    assert "__version__" not in fastvae.__all__
    with mock.patch("importlib.metadata.version", side_effect=importlib.metadata.PackageNotFoundError("fastvae")):
        assert fastvae._version() == "0+unknown"


def test_the_notes_on_user_errors_link_existing_sections():
    """Each doc section a note on a user callable's error links (fastvae/_decoder.py)
    is a heading of its page, by GitHub's anchor rule."""
    from fastvae import _decoder

    root = PAGE.parents[1]
    for link in (_decoder.DECODER_DOCS, _decoder.FOLDED_DOCS, _decoder.EVALUATION_DOCS, _decoder.LOG_WEIGHT_DOCS):
        page, anchor = link.split("#")
        headings = re.findall(r"^#+ (.+)$", (root / page).read_text(), re.M)
        anchors = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
        assert anchor in anchors, (link, sorted(anchors))


def test_sanitize_takes_its_tests_from_the_registry():
    """.ci/sanitize runs every test module the registry names, not a hand-kept
    list: it names only the two main-process modules that reach the C++ besides them."""
    root = Path(__file__).resolve().parent.parent
    sanitize = (root / ".ci" / "sanitize").read_text()
    assert "_registry.interpreter_test_modules()" in sanitize
    assert set(re.findall(r"tests/test_\w+\.py", sanitize)) == {"tests/test_backend.py", "tests/test_torch_ops.py"}


def test_every_likelihood_is_listed_in_the_docs():
    """docs/objectives.md's decoder table and docs/likelihoods.md's table name
    every likelihood= the objectives accept, and the README names each."""
    from fastvae._decoder import LIKELIHOODS

    root = PAGE.parents[1]
    objectives = (root / "docs" / "objectives.md").read_text()
    likelihoods = (root / "docs" / "likelihoods.md").read_text()
    readme = (root / "README.md").read_text()
    for name in LIKELIHOODS:
        assert re.search(rf'^\| `"{name}"` \|', objectives, re.M), f"{name} missing from docs/objectives.md's table"
        assert re.search(rf'^\| `"{name}"` \|', likelihoods, re.M), f"{name} missing from docs/likelihoods.md's table"
        assert f'"{name}"' in readme, f"{name} missing from the README"


def test_the_readme_says_how_to_get_the_cpu_build_and_links_the_changelog():
    readme = (PAGE.parents[1] / "README.md").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme
    assert "(CHANGELOG.md)" in readme and (PAGE.parents[1] / "CHANGELOG.md").exists()
    assert not re.search(r"\(issue \d+\)", readme), "the README speaks to users: no internal issue numbers"


def test_benchmarks_readme_quotes_the_recorded_overhead_figures():
    """Every microsecond figure benchmarks/README.md quotes from
    results/overhead-cpu.json is that file's median, to 0.1 us."""
    import json

    root = PAGE.parents[1]
    text = " ".join((root / "benchmarks" / "README.md").read_text().split())
    results = json.loads((root / "benchmarks" / "results" / "overhead-cpu.json").read_text())["results"]
    median = {(r["case"], r["impl"], r["mode"]): r["median_us"] for r in results}
    quoted = {
        ("floor: empty op (custom_op + register_autograd)", "fastvae", "fwd+bwd"): "costs {} us per",
        ("floor: empty op (define + Function)", "fastvae", "fwd+bwd"): "around the op {} us",
        ("floor: x * 2", "eager", "fwd+bwd"): "against {} us for a plain",
        ("sample_normal (100, 8)", "fastvae", "fwd+bwd"): "sample_normal at (100, 8) {} us",
        ("sample_normal (100, 8)", "eager", "fwd+bwd"): "against {} us in eager torch",
        ("bernoulli_log_prob (100, 64)", "fastvae", "fwd+bwd"): "bernoulli_log_prob at (100, 64) {} us",
        ("bernoulli_log_prob (100, 64)", "eager", "fwd+bwd"): "us against {} us, kl_normal",
        ("kl_normal (100, 8)", "fastvae", "fwd+bwd"): "kl_normal at (100, 8) {} us",
        ("kl_normal (100, 8)", "eager", "fwd+bwd"): "us against {} us, logmeanexp",
        ("logmeanexp (16, 100)", "fastvae", "fwd+bwd"): "logmeanexp at (16, 100) {} us",
        ("step: digits ELBO (B=100, D=64, L=8)", "fastvae", "step"): "ELBO step took {} us",
        ("step: digits ELBO (B=100, D=64, L=8)", "eager", "step"): "the hand-written {} us",
        ("step: digits IWAE k=16", "fastvae", "step"): "IWAE step {} us",
        ("step: digits IWAE k=16", "eager", "step"): "against {} us. What is left",
        ("sample_normal (100, 8)", "fastvae", "forward"): "costs {} us forward",
    }
    for key, phrase in quoted.items():
        assert phrase.format(f"{median[key]:.1f}") in text, (key, phrase, median[key])


def test_architecture_quotes_the_launch_limits_the_launch_test_asserts():
    """The per-call launch counts docs/architecture.md quotes are the limits
    tests/test_launches.py asserts."""
    import test_launches

    text = " ".join((PAGE.parents[1] / "docs" / "architecture.md").read_text().split())
    lim = test_launches.OBJECTIVE_LIMITS
    assert (f"elbo {lim['elbo bernoulli']} (Bernoulli) and {lim['elbo gaussian']} (Gaussian with the halves of "
            f"one output), iwae k=5 {lim['iwae']}, DReG {lim['iwae dreg']}") in text
    assert not test_launches.NOT_YET


_BAD_INPUTS = PAGE.parent / "bad-inputs.md"


def _bad_input_rows() -> list[tuple[str, str]]:
    """(code, what you get) of every row of docs/bad-inputs.md's tables: a
    code cell in backticks, and the message quoted first in the last cell
    (None where the row's code asserts its outcome itself)."""
    rows = []
    for line in _BAD_INPUTS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) != 3 or not cells[1].startswith("`") or cells[1] == "code":
            continue
        code = cells[1][1:-1]
        quoted = re.search(r"`(\w+(?:Error|Warning)): ([^`]*)`", cells[2])
        rows.append((code, quoted.groups() if quoted else None))
    return rows


def _matches(message: str, quoted: str) -> bool:
    """The quoted text's pieces between '...' appear in the message in order."""
    pattern = ".*?".join(re.escape(piece.strip()) for piece in quoted.split("..."))
    return re.search(pattern, message, re.S) is not None


@pytest.mark.skipif(INTERPRET, reason="main-process test (backend-independent)")
def test_bad_inputs_rows_run_as_written():
    """Each row of docs/bad-inputs.md, after the page's own setup block: the
    message it quotes (an exception, or a warning), or its own assert with
    no warning at all."""
    import warnings

    import fastvae

    rows = _bad_input_rows()
    assert len(rows) >= 40
    (setup,) = re.findall(r"```python\n(.*?)```", _BAD_INPUTS.read_text(), re.S)
    for code, expected in rows:
        namespace: dict = {}
        exec(setup, namespace)  # noqa: S102 (the page's own setup)
        fastvae.set_value_checks("auto")  # each row warns afresh (a warning is given once per kind)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                exec(compile(code, str(_BAD_INPUTS), "exec"), namespace)  # noqa: S102 (the page's rows)
            except Exception as e:  # noqa: BLE001 (the row says which)
                assert expected is not None, f"{code!r} raised {e!r}"
                kind, quoted = expected
                assert type(e).__name__ == kind or kind in [c.__name__ for c in type(e).__mro__], (code, e)
                assert _matches(str(e), quoted), (code, str(e), quoted)
                continue
        if expected is None:
            assert not caught, (code, [str(w.message) for w in caught])
            continue
        kind, quoted = expected
        assert kind.endswith("Warning"), f"{code!r} ran without the {kind} the page quotes"
        assert any(type(w.message).__name__ == kind and _matches(str(w.message), quoted) for w in caught), \
            (code, [str(w.message) for w in caught], quoted)


def test_the_readme_states_the_torch_floor_that_ci_tests():
    """The README's supported torch versions start at pyproject.toml's floor,
    which .ci/compat installs and runs the compile tests on."""
    root = PAGE.parents[1]
    (floor,) = re.findall(r'"torch>=(\d+\.\d+)"', (root / "pyproject.toml").read_text())
    readme = (root / "README.md").read_text()
    assert f"**Torch versions.** torch {floor} or newer." in readme
    assert f"# any torch >= {floor};" in readme
    assert "bash .ci/compat" in readme
    assert 'torch>=(' in (root / ".ci" / "compat").read_text()  # it reads the floor from pyproject.toml
