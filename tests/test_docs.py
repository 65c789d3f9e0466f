"""The README and the guide as a user reads them: their code runs as written, the
signatures they write are the functions', their links resolve, and what CI
runs is what they say."""
import re
from pathlib import Path

import pytest
import torch

from conftest import INTERPRET

PAGE = Path(__file__).resolve().parents[1] / "docs" / "from-torch-distributions.md"


@pytest.mark.skipif(INTERPRET, reason="main-process test (backend-independent)")
def test_from_torch_distributions_page_runs():
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)  # noqa: S102 (the page's own examples)


@pytest.mark.skipif(INTERPRET, reason="main-process test (backend-independent)")
def test_readme_code_blocks_run():
    """The README's training loop is complete: it runs as written, with nothing
    given beforehand, trains, and prints the held-out log p(x) with its stats."""
    readme = PAGE.parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    assert len(blocks) >= 1
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(readme), "exec"), namespace)  # noqa: S102 (the README's own examples)
    stats = namespace["stats"]
    assert stats.log_likelihood.shape == (128,) and torch.isfinite(stats.log_likelihood).all()
    assert torch.isfinite(namespace["loss"]) and namespace["step"] > 0


def test_the_readme_fits_on_a_few_screens_and_puts_the_cpu_build_first():
    """The README is for users (measurements live in benchmarks/README.md, the
    build in docs/install.md): at most 150 lines, and in "Try it" the CPU
    wheel's install comes before the command that would otherwise pull the
    CUDA build from the ordinary index."""
    readme = (PAGE.parents[1] / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    try_it = readme.split("## Try it", 1)[1].split("\n## ", 1)[0]
    cpu = try_it.index("--index-url https://download.pytorch.org/whl/cpu")
    assert cpu < try_it.index("python -m pip install -e")


def test_ci_runs_the_readmes_test_commands_in_a_fresh_venv():
    """CI on a clean machine: .ci/run runs the README's test command (the
    quick tier) word for word, inside a venv it makes itself, then the
    README's full tier (less what the quick run just ran, --skip-quick), as
    CONTRIBUTING.md says; .ci/sanitize installs the build requirements its own
    setup.py call needs."""
    root = PAGE.parents[1]
    readme = (root / "README.md").read_text()
    (command,) = re.findall(r"^# the tests.*\n(.+)$", readme, re.M)
    (full,) = re.findall(r"^# the full tier.*\n(.+)$", readme, re.M)
    run = (root / ".ci" / "run").read_text()
    assert command.strip() in run.splitlines()
    assert run.index("python -m venv") < run.index("source") < run.index(command.strip())
    (ci_full,) = [line for line in run.splitlines() if line.startswith(full.strip() + " ")]
    assert run.index(command.strip()) < run.index(ci_full)
    assert set(ci_full.split()[len(full.split()):]) <= {"--skip-quick", "--durations=25"}, ci_full
    contributing = (root / "CONTRIBUTING.md").read_text()
    assert command.strip() in contributing and full.strip() in contributing and "--skip-quick" in contributing
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
    which .ci/compat installs and runs the compile tests on (docs/install.md,
    where the build detail lives, says how)."""
    root = PAGE.parents[1]
    (floor,) = re.findall(r'"torch>=(\d+\.\d+)"', (root / "pyproject.toml").read_text())
    readme = (root / "README.md").read_text()
    install = (root / "docs" / "install.md").read_text()
    assert f"**Torch versions.** torch {floor} or newer" in readme
    assert f"**Torch versions.** torch {floor} or newer." in install
    assert f"# any torch >= {floor};" in install
    assert "bash .ci/compat" in install
    assert 'torch>=(' in (root / ".ci" / "compat").read_text()  # it reads the floor from pyproject.toml


_ROOT = PAGE.parents[1]
_DOC_PAGES = [_ROOT / "README.md", _ROOT / "CONTRIBUTING.md", *sorted((_ROOT / "docs").rglob("*.md"))]


def _closing(text: str, i: int) -> int | None:
    """The index of the bracket that closes the one at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] in "([{":
            depth += 1
        elif text[j] in ")]}":
            depth -= 1
            if depth == 0:
                return j
    return None


def _arguments(text: str) -> list[str]:
    """An argument list split at its top-level commas."""
    out, depth, cur = [], 0, ""
    for c in text:
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += c
    return out + [cur.strip()] if cur.strip() else out


def _doc_signatures():
    """(page, line, name, arguments) of every signature the docs write out for a
    name in fastvae.__all__: a call written at the start of a line of a fenced
    block without a language (the pages' signature blocks), or anywhere with a
    bare `*` among its arguments or `->` after it, which no call has."""
    import fastvae

    names = [n for n in fastvae.__all__ if callable(getattr(fastvae, n))]
    for page in _DOC_PAGES:
        text = page.read_text()
        plain = [(m.start(1), m.end(1)) for m in re.finditer(r"^```\n(.*?)^```", text, re.S | re.M)]
        for name in names:
            for m in re.finditer(rf"(?:(?<=fastvae\.)|(?<![\w.])){name}\(", text):
                end = _closing(text, m.end() - 1)
                if end is None:
                    continue
                args = _arguments(" ".join(text[m.end():end].split()))
                line_start = text.rfind("\n", 0, m.start()) + 1
                at_line_start = re.fullmatch(r"\s*(\w+ = )?(fastvae\.)?", text[line_start:m.start()]) is not None
                in_plain = at_line_start and any(a <= m.start() < b for a, b in plain)
                marked = "*" in args or text[end + 1:end + 5].lstrip().startswith("->")
                if in_plain or marked:
                    yield page.relative_to(_ROOT), text.count("\n", 0, m.start()) + 1, name, args


def test_every_signature_in_the_docs_is_the_functions():
    """A signature the docs write out names the function's parameters in its
    order, with its keyword-only marker and defaults (inspect.signature), and
    all of them unless it says `...` for the rest: a parameter added to a
    function (a log_likelihood's prior=) fails here until the page shows it."""
    import ast
    import inspect

    import fastvae

    found = list(_doc_signatures())
    assert {name for _, _, name, _ in found} >= {"elbo", "iwae", "log_likelihood", "evaluate",
                                                 "hierarchical_elbo", "sample_concrete", "gaussian_log_prob"}
    problems = []
    for page, line, name, args in found:
        where = f"{page}:{line}: {name}"
        params = list(inspect.signature(getattr(fastvae, name)).parameters.values())
        index = {p.name: i for i, p in enumerate(params)}
        keyword_only, partial, last, seen = False, False, -1, set()
        for arg in args:
            if arg == "*":
                keyword_only = True
                continue
            if "..." in arg:
                partial = True
                continue
            star, rest = re.fullmatch(r"(\**)(.*)", arg).groups()
            pname, _, default = (s.strip() for s in rest.partition("="))
            pname = pname.split(":")[0].strip()
            if pname not in index:
                problems.append(f"{where}: no parameter {pname!r} (it has {list(index)})")
                continue
            p = params[index[pname]]
            seen.add(pname)
            if index[pname] < last:
                problems.append(f"{where}: {pname!r} out of order")
            last = index[pname]
            kind = {"*": p.VAR_POSITIONAL, "**": p.VAR_KEYWORD}.get(star)
            if kind is not None:
                if p.kind != kind:
                    problems.append(f"{where}: {pname!r} is {p.kind.description}")
                keyword_only = keyword_only or star == "*"
                continue
            if keyword_only != (p.kind == p.KEYWORD_ONLY):
                problems.append(f"{where}: {pname!r} is {p.kind.description}")
            if not default:
                if p.default is not p.empty:
                    problems.append(f"{where}: {pname!r} has the default {p.default!r}")
                continue
            try:
                same = ast.literal_eval(default) == p.default
            except ValueError:
                same = default == repr(p.default)
            if not same:
                problems.append(f"{where}: {pname!r}'s default is {p.default!r}, not {default}")
        missing = [p.name for p in params if p.name not in seen]
        if missing and not partial:
            problems.append(f"{where}: leaves out {missing}")
    assert not problems, "\n".join(problems)


def test_the_api_reference_has_an_entry_for_every_public_name():
    """docs/api/conf.py writes the reference's entries from fastvae.__all__
    (.ci/docs builds it and checks the built inventory too)."""
    import importlib.util

    import fastvae

    spec = importlib.util.spec_from_file_location("api_conf", _ROOT / "docs" / "api" / "conf.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    entries = conf._entries()
    for name in fastvae.__all__:
        assert re.search(rf"^\.\. auto(function|class|module):: (fastvae\.)?{name}$", entries, re.M), name
    assert '"sphinx' in (_ROOT / "pyproject.toml").read_text().split("\ndocs = ", 1)[1].split("\n", 1)[0]


# where pages, code, error messages and tests point a reader
_LINKING = [*_DOC_PAGES, _ROOT / "benchmarks" / "README.md",
            *[p for folder in ("fastvae", "kernels", "tests", "benchmarks", "examples")
              for p in (_ROOT / folder).rglob("*.py")]]


def test_every_link_to_a_page_resolves():
    """Every docs/... path named anywhere and every relative Markdown link
    leads to a file: text moved between the guide and the internals
    (docs/internals/) leaves no reference behind."""
    broken = []
    for path in _LINKING:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"(?<![\w/.])docs/[\w./-]+\.(md|rst|py)\b", text):
            if not (_ROOT / m.group(0)).exists():
                broken.append(f"{path.relative_to(_ROOT)}: {m.group(0)}")
        if path.suffix == ".md":
            for m in re.finditer(r"\]\(([^)#\s]+)(#[^)]*)?\)", text):
                target = m.group(1)
                if "://" not in target and not (path.parent / target).exists():
                    broken.append(f"{path.relative_to(_ROOT)}: ({target})")
    assert not broken, "\n".join(broken)


_GUIDE = ["objectives", "likelihoods", "latents", "evaluation", "hierarchical", "migrating", "bad-inputs",
          "from-torch-distributions", "integrations"]


@pytest.mark.skipif(INTERPRET, reason="main-process test (backend-independent)")
@pytest.mark.parametrize("page", _GUIDE)
def test_each_guide_page_opens_with_its_calls_and_an_example_that_runs(page):
    """A guide page's opening, before its first section, names the fastvae
    calls it covers and has an example that runs as written."""
    import warnings

    text = (_ROOT / "docs" / f"{page}.md").read_text()
    head = text.split("\n## ", 1)[0]
    assert re.search(r"fastvae\.\w+\(|`fastvae\.\w+`", head), f"docs/{page}.md does not open with its calls"
    blocks = re.findall(r"```python\n(.*?)```", head, re.S)
    assert blocks, f"docs/{page}.md has no example at its top"
    if "sklearn" in blocks[0]:
        pytest.importorskip("sklearn")
    if "pyro" in blocks[0]:
        pytest.importorskip("pyro", reason="docs/integrations.md's example needs pyro-ppl (fastvae[integrations])")
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained stand-in model's evaluation warns, as it should
        exec(compile(blocks[0], f"docs/{page}.md", "exec"), namespace)  # noqa: S102 (the page's own example)
