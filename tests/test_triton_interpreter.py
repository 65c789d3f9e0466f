"""Runs the op tests against the Triton kernels under the Triton interpreter.

The interpreter must be switched on (TRITON_INTERPRET=1) before Triton is
imported, and interpreted and compiled kernels must not share a process, so
the kernels are tested in a child pytest process; this file only launches it
and, in the child, the cross-backend comparison of cpp and triton samples.
conftest.py starts the child at the end of collection, so that it runs beside
the main process's tests (2 cores: about 7 minutes off the suite's wall time).
"""
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import fastvae
from fastvae._registry import interpreter_test_modules

from conftest import INTERPRET

ROOT = Path(__file__).parent.parent
OP_TESTS = interpreter_test_modules()  # every op's test module, and those above the ops (from ROOT)


def _interpreter_env():
    env = dict(os.environ, TRITON_INTERPRET="1", FASTVAE_BACKEND="triton")
    return env


_PREFIX = "[triton interpreter] "
_TIMEOUT_S = 2700
_child: dict = {}  # the running child: "proc", "log" (its output file), "started" (time.monotonic())


def start_child() -> None:
    """Starts the child pytest run of the op tests under the interpreter, its
    output going to a file. conftest.py calls this at the end of collection
    when the launcher test below is selected, so the child (the longest part of
    the suite, one core) runs beside the main process's tests instead of after
    them; the launcher test then waits for it. Once per session."""
    if _child or INTERPRET or importlib.util.find_spec("triton") is None:
        return
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *[str(ROOT / t) for t in OP_TESTS]]
    log = tempfile.NamedTemporaryFile("w+", prefix="fastvae-interpreter-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, env=_interpreter_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            text=True)
    _child.update(proc=proc, log=log, started=time.monotonic())


def stop_child() -> None:
    """Kills the child if it still runs (the session ended before the launcher
    test waited for it) and removes its output file."""
    if not _child:
        return
    if _child["proc"].poll() is None:
        _child["proc"].kill()
        _child["proc"].wait()
    if os.path.exists(_child["log"].name):
        os.unlink(_child["log"].name)


@pytest.mark.skipif(INTERPRET, reason="this is the launcher; the child process runs the tests")
def test_op_tests_under_triton_interpreter(capsys):
    """The child's output streams to the terminal from its file while this
    waits (it takes minutes: a silent test looked hung), and its tail is kept
    for the failure message; a child running past _TIMEOUT_S is killed."""
    pytest.importorskip("triton")
    start_child()  # already running when conftest started it
    proc, log, started = _child["proc"], _child["log"], _child["started"]
    timed_out = False
    with open(log.name) as out, capsys.disabled():  # past pytest's capture, straight to the terminal
        print(f"\n{_PREFIX}the op tests on the Triton kernels, in a child process started at collection "
              f"({len(OP_TESTS)} modules; minutes on 2 cores):", flush=True)
        lines: list[str] = []
        pending = ""  # a line the child has not finished writing (pytest's dots come a few at a time)
        while True:
            done = proc.poll() is not None
            *complete, pending = (pending + out.read()).split("\n")  # what the child wrote since the last read
            if done and pending:
                complete.append(pending)
            for line in complete:
                lines.append(line + "\n")
                print(_PREFIX + line, flush=True)
            if done:
                break
            if time.monotonic() - started > _TIMEOUT_S:  # a hung interpreter must fail the run, not stall CI
                timed_out = True
                proc.kill()
                proc.wait()
                break
            time.sleep(1.0)
    output = "".join(lines)
    tail = output[-6000:]
    assert not timed_out, f"interpreter tests killed after {_TIMEOUT_S} s:\n{tail}"
    # exit 5 means no test ran: the interpreter run must have tested something
    assert proc.returncode == 0, f"interpreter tests failed (exit {proc.returncode}):\n{tail}"
    assert " passed" in output, tail


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
