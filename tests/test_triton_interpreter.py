"""Runs the op tests against the Triton kernels under the Triton interpreter.

The interpreter must be switched on (TRITON_INTERPRET=1) before Triton is
imported, and interpreted and compiled kernels must not share a process, so
the kernels are tested in a child pytest process; this file only launches it
and, in the child, the cross-backend comparison of cpp and triton samples.
"""
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import fastvae
from fastvae._registry import interpreter_test_modules

from conftest import INTERPRET

TESTS = Path(__file__).parent
OP_TESTS = interpreter_test_modules()  # every op's test module, and those above the ops


def _interpreter_env():
    env = dict(os.environ, TRITON_INTERPRET="1", FASTVAE_BACKEND="triton")
    return env


_PREFIX = "[triton interpreter] "
_TIMEOUT_S = 2700


@pytest.mark.skipif(INTERPRET, reason="this is the launcher; the child process runs the tests")
def test_op_tests_under_triton_interpreter(capsys):
    """The child's output streams to the terminal as it runs (it takes minutes:
    a silent test looked hung), and its tail is kept for the failure message."""
    pytest.importorskip("triton")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *[str(TESTS / t) for t in OP_TESTS]]
    proc = subprocess.Popen(cmd, env=_interpreter_env(), cwd=TESTS.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    # a hung interpreter must fail the run, not stall CI
    timed_out = threading.Event()
    watchdog = threading.Timer(_TIMEOUT_S, lambda: (timed_out.set(), proc.kill()))
    watchdog.start()
    lines: list[str] = []
    try:
        with capsys.disabled():  # past pytest's capture, straight to the terminal
            print(f"\n{_PREFIX}the op tests on the Triton kernels, in a child process "
                  f"({len(OP_TESTS)} modules; a few minutes on 2 cores):", flush=True)
            for line in proc.stdout:
                lines.append(line)
                print(_PREFIX + line, end="", flush=True)
        returncode = proc.wait()
    finally:
        watchdog.cancel()
    output = "".join(lines)
    tail = output[-6000:]
    assert not timed_out.is_set(), f"interpreter tests killed after {_TIMEOUT_S} s:\n{tail}"
    # exit 5 means no test ran: the interpreter run must have tested something
    assert returncode == 0, f"interpreter tests failed (exit {returncode}):\n{tail}"
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
