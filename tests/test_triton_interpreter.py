"""Runs the op tests against the Triton kernels under the Triton interpreter.

The interpreter must be switched on (TRITON_INTERPRET=1) before Triton is
imported, and interpreted and compiled kernels must not share a process, so
the kernels are tested in a child pytest process; this file only launches it
and, in the child, the cross-backend comparison of cpp and triton samples.
conftest.py starts the child at the end of collection, so that it runs beside
the main process's tests (2 cores: about 7 minutes off the suite's wall time),
and prints the child's progress lines among the main process's as they come.
"""
import importlib.util
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import fastvae
from fastvae._registry import interpreter_test_modules

from conftest import FULL, INTERPRET

ROOT = Path(__file__).parent.parent
OP_TESTS = interpreter_test_modules()  # every op's test module, and those above the ops (from ROOT)


def _interpreter_env():
    # unbuffered: each line of the child's progress reaches its file when written
    env = dict(os.environ, TRITON_INTERPRET="1", FASTVAE_BACKEND="triton", PYTHONUNBUFFERED="1")
    return env


_PREFIX = "[triton interpreter] "
_TIMEOUT_S = 2700 if FULL else 900  # a hung interpreter must fail the run, not stall CI
_PROGRESS_EVERY_S = 30  # the child's lines among the main process's: at most this often, not after every test
# the running child: "proc", "log" (its output file), "out" (that file, open for reading), "started" and
# "shown" (time.monotonic() of its start and of the last progress shown), "lines" (its complete lines read so far),
# "pending" (a line it has not finished writing: pytest's dots come a few at a time)
_child: dict = {}


def start_child() -> None:
    """Starts the child pytest run of the op tests under the interpreter, its
    output going to a file. conftest.py calls this at the end of collection
    when the launcher test below is selected, so the child (the longest part of
    the suite, one core) runs beside the main process's tests instead of after
    them; the launcher test then waits for it. Once per pytest run."""
    if _child or INTERPRET or importlib.util.find_spec("triton") is None:
        return
    # FASTVAE_INTERPRETER_ARGS: more pytest options for the child (e.g. "--durations=50")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           *shlex.split(os.environ.get("FASTVAE_INTERPRETER_ARGS", "")), *[str(ROOT / t) for t in OP_TESTS]]
    log = tempfile.NamedTemporaryFile("w+", prefix="fastvae-interpreter-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, env=_interpreter_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            text=True)
    now = time.monotonic()
    _child.update(proc=proc, log=log, out=open(log.name), started=now, shown=now, lines=[], pending="")


def _new_lines(final: bool = False) -> list[str]:
    """The child's complete output lines written since the last call (all of
    it, once the child has exited: ``final``), kept in _child["lines"] too."""
    *complete, _child["pending"] = (_child["pending"] + _child["out"].read()).split("\n")
    if final and _child["pending"]:
        complete.append(_child["pending"])
        _child["pending"] = ""
    _child["lines"].extend(complete)
    return complete


def show_progress(reporter) -> None:
    """Writes the child's new output lines through pytest's terminal reporter,
    at most every _PROGRESS_EVERY_S: conftest.py calls this after each test of
    the main process, so the interpreter run shows its progress as it goes,
    not only once the main process reaches the launcher test."""
    if not _child or time.monotonic() - _child["shown"] < _PROGRESS_EVERY_S:
        return
    _child["shown"] = time.monotonic()
    for line in _new_lines():
        reporter.write_line(_PREFIX + line)


def stop_child() -> None:
    """Kills the child if it still runs (the pytest run ended before the launcher
    test waited for it) and removes its output file."""
    if not _child:
        return
    if _child["proc"].poll() is None:
        _child["proc"].kill()
        _child["proc"].wait()
    _child["out"].close()
    if os.path.exists(_child["log"].name):
        os.unlink(_child["log"].name)


@pytest.mark.skipif(INTERPRET, reason="this is the launcher; the child process runs the tests")
def test_op_tests_under_triton_interpreter(capsys):
    """The child's output streams to the terminal while this waits (what the
    main process's tests have not shown yet first, then each line as it comes:
    it takes minutes, and a silent test looked hung), and its tail is kept for
    the failure message; a child running past _TIMEOUT_S is killed."""
    pytest.importorskip("triton")
    start_child()  # already running when conftest started it
    proc, started = _child["proc"], _child["started"]
    timed_out = False
    with capsys.disabled():  # past pytest's capture, straight to the terminal
        print(f"\n{_PREFIX}the op tests on the Triton kernels, in a child process started at collection "
              f"({len(OP_TESTS)} modules; minutes on 2 cores):", flush=True)
        while True:
            done = proc.poll() is not None
            for line in _new_lines(final=done):
                print(_PREFIX + line, flush=True)
            if done:
                break
            if time.monotonic() - started > _TIMEOUT_S:
                timed_out = True
                proc.kill()
                proc.wait()
                break
            time.sleep(1.0)
    output = "".join(line + "\n" for line in _child["lines"])
    tail = output[-6000:]
    assert not timed_out, f"interpreter tests killed after {_TIMEOUT_S} s:\n{tail}"
    # exit 5 means no test ran: the interpreter run must have tested something
    assert proc.returncode == 0, f"interpreter tests failed (exit {proc.returncode}):\n{tail}"
    assert " passed" in output, tail


@pytest.mark.skipif(INTERPRET, reason="main-process test of the launcher")
def test_child_progress_shows_its_complete_lines_every_half_minute(tmp_path, monkeypatch):
    """show_progress, called after each main-process test: the child's new
    complete lines, each once, marked as the child's, at most every
    _PROGRESS_EVERY_S; a line the child is still writing waits for its end
    (or for the child's exit)."""
    log = tmp_path / "child.log"
    log.write_text("")
    with open(log) as out:
        child = dict(out=out, shown=time.monotonic(), lines=[], pending="")
        monkeypatch.setattr(sys.modules[__name__], "_child", child)
        shown = []
        reporter = type("Reporter", (), {"write_line": lambda self, line: shown.append(line)})()

        def later():  # as if the interval had passed since the last progress shown
            child["shown"] -= _PROGRESS_EVERY_S + 1

        log.write_text("tests/a.py ....\n....")
        show_progress(reporter)
        assert shown == []  # too soon
        later()
        show_progress(reporter)
        assert shown == [_PREFIX + "tests/a.py ...."]
        with open(log, "a") as f:
            f.write("..  [100%]\n1 passed")
        show_progress(reporter)
        assert len(shown) == 1  # too soon again
        later()
        show_progress(reporter)
        assert shown[1:] == [_PREFIX + "......  [100%]"]
        assert _new_lines(final=True) == ["1 passed"]  # the child has exited: its last line, unfinished
        assert child["lines"] == ["tests/a.py ....", "......  [100%]", "1 passed"]


_CHILD_SCRIPT = """
import sys, torch, fastvae
mu, logvar = torch.load(sys.argv[1])
torch.manual_seed(31337)
z, kl = fastvae.sample_normal(mu, logvar, 3)
torch.save((z, kl), sys.argv[2])
"""


@pytest.mark.skipif(INTERPRET, reason="compares the cpp backend (this process) with the interpreter")
def test_cpp_and_triton_draw_the_same_samples(tmp_path, monkeypatch):
    """For the same torch seed, cpp and triton return the same z (float32 log/cos apart)."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(37, 45, generator=g) * 2
    logvar = torch.randn(37, 45, generator=g) * 3
    torch.save((mu, logvar), tmp_path / "in.pt")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        env=_interpreter_env(), capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    z_triton, kl_triton = torch.load(tmp_path / "out.pt")
    fastvae._backend.set_backend("cpp")
    torch.manual_seed(31337)
    z_cpp, kl_cpp = fastvae.sample_normal(mu, logvar, 3)
    s = torch.exp(0.5 * logvar)
    # eps agrees to ~1e-6 absolute (|eps| <= 5.7); z inherits it scaled by s
    assert ((z_cpp - z_triton).abs() <= 2e-6 * (mu.abs() + s * 6)).all()
    assert not torch.equal(z_cpp[0], z_cpp[1])
    torch.testing.assert_close(kl_cpp, kl_triton, rtol=2e-6, atol=1e-5)
