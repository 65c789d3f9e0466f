"""Backend choice, the FASTVAE_BACKEND override and the missing-extension message."""
import math
import os
import sys
import warnings

import pytest
import torch

import fastvae
from fastvae import _backend, _plan, _registry

from conftest import INTERPRET
from helpers import gen, op_cases

pytestmark = pytest.mark.skipif(INTERPRET, reason="main-process tests")


def test_default_cpu_backend_is_cpp():
    fastvae.set_backend(None)
    assert fastvae.backend_info("cpu") == {op: "cpp" for op in _registry.OPS}
    assert _backend.backend_for("cuda") == "triton"


def test_override(monkeypatch):
    fastvae._backend.set_backend("reference")
    assert fastvae.backend_info("cpu") == {op: "reference" for op in _registry.OPS}
    assert _backend.backend_for("cuda") == "reference"
    with pytest.raises(ValueError, match="bogus"):
        fastvae.set_backend("bogus")
    assert _backend.requested_backend() == "reference"  # a refused name changes nothing
    fastvae._backend.set_backend("cpp")
    with pytest.raises(ValueError, match="CPU tensors only"):
        _backend.backend_for("cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    fastvae._backend.set_backend("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fastvae.sample_normal(torch.zeros(2, 3), torch.zeros(2, 3))


def test_missing_extension_is_explained(monkeypatch):
    monkeypatch.setattr(_backend, "_load_cpp", lambda: ImportError("no module named fastvae._C"))
    monkeypatch.setattr(_backend, "_functions", {})  # kernels already looked up
    fastvae._backend.set_backend(None)
    _backend._warn_missing_cpp.cache_clear()
    with pytest.warns(RuntimeWarning, match="pip install -e ."):
        z, kl = fastvae.sample_normal(torch.zeros(2, 3), torch.zeros(2, 3))
    assert fastvae.backend_info()["sample_normal"] == "reference (cpp extension missing)"
    fastvae._backend.set_backend("cpp")
    with pytest.raises(RuntimeError, match="not built"):
        fastvae.sample_normal(torch.zeros(2, 3), torch.zeros(2, 3))


def test_cpp_boundary_checks_shapes_and_dtypes():
    """The extension refuses arrays whose extents or dtypes do not match, before touching memory."""
    from fastvae import _C

    mu = torch.zeros(4, 3).numpy()
    z = torch.zeros(2, 4, 3).numpy()
    with pytest.raises(ValueError, match="kl: expected shape"):
        _C.sample_normal_forward(mu, mu, 1, 0, 12, 3, z, torch.zeros(5).numpy(), None, 1)
    with pytest.raises(ValueError, match="logvar: expected shape"):
        _C.sample_normal_forward(mu, torch.zeros(4, 2).numpy(), 1, 0, 12, 3, z, torch.zeros(4).numpy(), None, 1)
    with pytest.raises(TypeError, match="logvar: expected dtype"):
        _C.sample_normal_forward(mu, mu.astype("float64"), 1, 0, 12, 3, z, torch.zeros(4).numpy(), None, 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.sample_normal_forward(mu, torch.zeros(3, 4).numpy().T, 1, 0, 12, 3, z, torch.zeros(4).numpy(), None, 1)
    with pytest.raises(ValueError, match="read-only"):
        ro = torch.zeros(4).numpy()
        ro.flags.writeable = False
        _C.sample_normal_forward(mu, mu, 1, 0, 12, 3, z, ro, None, 1)
    with pytest.raises(ValueError, match="n_threads"):
        _C.sample_normal_forward(mu, mu, 1, 0, 12, 3, z, torch.zeros(4).numpy(), None, 0)
    with pytest.raises(TypeError, match="float32 and float64"):
        _C.kl_normal_forward(torch.zeros(2, 2, dtype=torch.int32).numpy(), mu, None, None, torch.zeros(2).numpy(), 1)
    # an optional buffer that is not an array is refused, not converted (a copy would swallow writes)
    with pytest.raises(TypeError, match="prior_mu: expected a NumPy array or None"):
        _C.kl_normal_forward(mu, mu, [[0.0] * 3] * 4, mu, torch.zeros(4).numpy(), 1)
    # a variance floor the float32 kernel cannot represent as a normal number
    x = torch.zeros(4, 3).numpy()
    with pytest.raises(ValueError, match="delta"):
        _C.gaussian_log_prob_forward(x, z, torch.zeros(3).numpy(), True, 1e-45, torch.zeros(2, 4).numpy(), 1)
    # a decoder output of another rank is named as the binding names it
    with pytest.raises(ValueError, match=r"^loc: expected a 3-d \(K, P, D\) array"):
        _C.laplace_log_prob_forward(x, x, torch.zeros(3).numpy(), torch.zeros(2, 4).numpy(), 1)
    # the last Philox offset must fit in int64, for the uniforms too
    with pytest.raises(ValueError, match=r"2\*\*63"):
        _C.uniform_fill(1, 2**63 - 2, torch.zeros(4).numpy(), torch.zeros(4).numpy())


def _misaligned(values: torch.Tensor) -> torch.Tensor:
    """A float32 tensor with these values whose data sits one byte past an
    aligned address (torch.frombuffer at offset 1), as a user's byte buffer can give."""
    raw = bytearray(values.numel() * 4 + 1)
    t = torch.frombuffer(raw, dtype=torch.float32, offset=1, count=values.numel()).reshape(values.shape)
    t.copy_(values)
    assert t.data_ptr() % 4 != 0
    return t


def test_cpp_refuses_misaligned_arrays():
    """A misaligned array never reaches a kernel: the boundary names it (UBSan reported misaligned loads)."""
    from fastvae import _C

    mu = _misaligned(torch.randn(4, 3)).numpy()
    with pytest.raises(_C.MisalignedArrayError, match="mu: data is not aligned to 4 bytes"):
        _C.kl_normal_forward(mu, torch.zeros(4, 3).numpy(), None, None, torch.zeros(4).numpy(), 1)
    assert issubclass(_C.MisalignedArrayError, ValueError)


@pytest.mark.skipif(not _backend.cpp_available(), reason="needs the cpp extension")
def test_misaligned_inputs_run_on_aligned_copies():
    """The front end gives the same values and gradients for a misaligned input as for an aligned copy."""
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    with fastvae.use_backend("cpp"):
        odd = _misaligned(mu).requires_grad_()
        kl = fastvae.kl_normal(odd, logvar)
        kl.sum().backward()
        aligned = mu.clone().requires_grad_()
        kl_ref = fastvae.kl_normal(aligned, logvar)
        kl_ref.sum().backward()
        assert torch.equal(kl, kl_ref) and torch.equal(odd.grad, aligned.grad)
        x = (torch.rand(5, 7, generator=g) > 0.5).float()
        logits = torch.randn(5, 7, generator=g)
        assert torch.equal(fastvae.bernoulli_log_prob(_misaligned(x), _misaligned(logits)),
                           fastvae.bernoulli_log_prob(x, logits))


def test_use_backend_restores_the_previous_choice():
    fastvae.set_backend("cpp")
    with fastvae.use_backend("reference"):
        assert _backend.backend_for("cpu") == "reference"
    assert _backend.backend_for("cpu") == "cpp"


def test_environment_is_read_once_at_import(monkeypatch):
    """FASTVAE_BACKEND set after import changes nothing: reading it per call cost
    more than a small kernel. set_backend is the run-time switch."""
    fastvae.set_backend(None)
    monkeypatch.setenv("FASTVAE_BACKEND", "reference")
    assert _backend.backend_for("cpu") == "cpp"
    import subprocess
    import sys

    code = "import fastvae; print(fastvae.backend_info()['sample_normal'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "reference"


def test_cpu_work_imports_no_triton():
    """Triton is not a dependency (a CPU install has none): training and
    evaluating on CPU tensors never imports it."""
    import subprocess

    script = (
        "import sys, torch, fastvae\n"
        "x, m = torch.zeros(4, 6), torch.zeros(4, 3)\n"
        "dec = lambda z: torch.zeros(*z.shape[:-1], 6)\n"
        "fastvae.elbo(x, m, m, dec, likelihood='bernoulli')\n"
        "fastvae.iwae(x, m, m, dec, k=3, likelihood='gaussian', estimator='dreg')\n"
        "fastvae.log_likelihood(x, lambda a: (m, m), dec, k=5, likelihood='gaussian')\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("FASTVAE_BACKEND", "TRITON_INTERPRET")}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)


def test_a_missing_triton_is_explained(monkeypatch):
    """The triton backend without Triton installed says how to get it."""
    import builtins

    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError("No module named 'triton'", name="triton")
        return real_import(name, *args, **kwargs)

    # the Triton modules imported so far (kernels/ and the op folders' triton.py), imported again below
    for mod in [m for m in list(sys.modules)
                if m.startswith("fastvae.kernels") or (m.startswith("fastvae.ops.") and m.endswith(".triton"))]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", no_triton)
    with pytest.raises(RuntimeError, match="needs Triton, which is not installed"):
        _backend.triton_module("kl_normal")


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device: the triton-cuda variants of the backend tests are not generated")
def test_triton_cuda_variants_are_generated_on_a_gpu():
    """The one place a CPU-only run reports its missing GPU: with one, every
    backend-parametrized test also runs on the triton backend with CUDA tensors."""
    from conftest import _backend_params

    assert any(p.id == "triton-cuda" for p in _backend_params())


@pytest.mark.skipif(not _backend.cpp_available(), reason="needs the cpp extension")
def test_cpp_kernels_follow_torch_set_num_threads(monkeypatch):
    """The OpenMP teams of the cpp kernels are never larger than torch's own
    (torch.set_num_threads), so the two never oversubscribe the cores; small
    calls stay on the calling thread. (Through the Function path, where the
    thread count can be watched; csrc/torch_ops.cpp's threads() is the same rule.)"""
    monkeypatch.setattr(_backend, "torch_ops", lambda *t: None)
    seen = []
    real = _backend.kernel_function("cpp", "kl_normal_forward")
    monkeypatch.setitem(_backend._functions, ("cpp", "kl_normal_forward"),
                        lambda *args: (seen.append(args[-1]), real(*args)))
    big = torch.zeros(4096, 64)
    previous = torch.get_num_threads()
    try:
        with fastvae.use_backend("cpp"):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                fastvae.kl_normal(big, big)
                assert seen[-1] == threads
            fastvae.kl_normal(torch.zeros(2, 3), torch.zeros(2, 3))
            assert seen[-1] == 1
    finally:
        torch.set_num_threads(previous)


def _reduction_cases():
    """name -> a call returning (outputs..., gradients...) of every op that reduces
    on the cpp backend, at sizes where 1, 2 and 4 threads all get work (each
    case at least 4 x MIN_WORK_PER_THREAD elements)."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    def run(fn, *leaves):
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        w = torch.Generator().manual_seed(1)
        total = sum((o * torch.randn(o.shape, generator=w, dtype=o.dtype)).sum() for o in outs)
        return [o.detach() for o in outs] + list(torch.autograd.grad(total, leaves))

    W = torch.randn(8, 16, generator=g)
    xe = torch.randn(40, 16, generator=g)
    cases = {
        "log_likelihood": [lambda: [fastvae.log_likelihood(xe, lambda t: (t @ W.T * 0.1, t[:, :8] * 0), lambda t: t @ W,
                                                           k=6000, likelihood="gaussian",
                                                           generator=gen(3))]],
    }
    cases.update((name, calls(leaf, run)) for name, calls in op_cases("thread_count_calls").items())
    return cases


def test_every_op_has_thread_count_and_fallback_cases():
    """Derived from the registry: an op added there and not here would have
    its thread-count bits and its fallback without the extension checked by nothing."""
    ops = set(_registry.OPS)
    assert sorted(ops - set(_reduction_cases())) == []
    assert sorted(ops - set(_every_op_call())) == []


@pytest.mark.skipif(not _backend.cpp_available(), reason="needs the cpp extension")
@pytest.mark.parametrize("path", ["eager", "function"])
def test_cpp_results_do_not_depend_on_the_thread_count(monkeypatch, path):
    """A reduction that split its work by the thread count would differ in the
    last bits between 1 and 2 threads (the ESS by up to 0.055), and a
    DataLoader worker (one thread) would disagree with its parent. Every
    reduction (logmeanexp, importance_weights, effective_sample_size, the
    mixture_log_prob backward) cuts its work by the shape alone: identical
    bits for 1, 2 and 4 threads, values and gradients, on the C++ operators'
    eager path and through the Functions."""
    if path == "function":
        monkeypatch.setattr(_backend, "torch_ops", lambda *tensors: None)
    cases = _reduction_cases()
    previous = torch.get_num_threads()
    results = {}
    try:
        with fastvae.use_backend("cpp"):
            for threads in (1, 2, 4):
                torch.set_num_threads(threads)
                results[threads] = {name: [f() for f in fns] for name, fns in cases.items()}
    finally:
        torch.set_num_threads(previous)
    for name in cases:
        for i, (one, two, four) in enumerate(zip(results[1][name], results[2][name], results[4][name])):
            for j, (a, b, c) in enumerate(zip(one, two, four)):
                assert torch.isfinite(a).all(), (name, i, j)
                assert torch.equal(a, b) and torch.equal(a, c), f"{name} case {i} tensor {j} differs between threads"


def _every_op_call():
    """op name -> a call of the public function on small CPU tensors that
    returns (output, gradients), shaped so that a cpp run would fold the
    likelihoods' samples (few x rows, K * P * D past 2 x MIN_WORK_PER_THREAD)."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    def run(fn, *leaves):
        out = fn(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        return out.detach(), torch.autograd.grad(out.sum(), leaves)

    mu, lv = leaf(3, 4), leaf(3, 4)
    x = leaf(2, 16)
    return {
        "elbo": lambda: run(lambda a, b: fastvae.elbo(x, a[:2], b[:2], lambda z: z @ torch.ones(4, 16, dtype=z.dtype),
                                                      likelihood="gaussian", generator=gen(2)), mu, lv),
        "iwae": lambda: run(lambda a, b: fastvae.iwae(x, a[:2], b[:2], lambda z: z @ torch.ones(4, 16, dtype=z.dtype),
                                                      k=3, likelihood="bernoulli", generator=gen(2)), mu, lv),
        "log_likelihood": lambda: (fastvae.log_likelihood(
            x.detach(), lambda t: (t[:, :4], t[:, 4:8]), lambda z: z @ torch.ones(4, 16, dtype=z.dtype), k=9,
            likelihood="gaussian", generator=gen(2)), ()),
        **{name: call(leaf, run) for name, call in op_cases("fallback_call").items()},
    }


@pytest.mark.parametrize("path", ["cpu", "cuda-python"])
def test_every_op_falls_back_without_the_extension(monkeypatch, path):
    """No op asks fastvae._C for anything (the thread count, say) before
    looking at the backend, which would raise without the extension instead of
    falling back, on CUDA tensors too. Every op and objective runs without _C:
    on the CPU on the reference backend (with the missing-extension warning),
    and through the CUDA path's Python (backend "triton", its kernels replaced
    here by the reference's, since no GPU is needed to reach them), matching
    the reference."""
    expected = {}
    with fastvae.use_backend("reference"):
        expected = {name: call() for name, call in _every_op_call().items()}
    monkeypatch.setattr(_backend, "_load_cpp", lambda: ImportError("no module named fastvae._C"))
    monkeypatch.setattr(_backend, "_functions", {})
    _backend._torch_ops.cache_clear()
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # the case that raised: more than one thread
    try:
        fastvae.set_backend(None)
        if path == "cpu":
            _backend._warn_missing_cpp.cache_clear()
            with pytest.warns(RuntimeWarning, match="pip install -e ."):
                assert _backend.backend_for("cpu") == "reference"
        else:
            monkeypatch.setitem(_backend._chosen, "cpu", "triton")  # what CUDA tensors get
            # the plans launch Triton's kernels themselves, past the functions replaced below
            # (tests/test_plan.py and the op's tests run them): the general path here
            monkeypatch.setattr(_plan, "ENABLED", False)
            for module in list(sys.modules.values()):  # and every op's own per-signature plans
                if getattr(module, "__name__", "").startswith("fastvae.ops.") and hasattr(module, "ENABLED") \
                        and (hasattr(module, "PLANS") or hasattr(module, "OP_PLANS")):
                    monkeypatch.setattr(module, "ENABLED", False)
            oracles = {name: _backend.kernel_function("reference", name) for name in _registry.KERNELS}
            for name in _registry.KERNELS:
                ref = oracles[name]
                _backend._functions["triton", name] = (
                    lambda ref=ref, **a: ref(**{k: int(v) if k == "seed" else v for k, v in a.items()}))
        got = {name: call() for name, call in _every_op_call().items()}
    finally:
        torch.set_num_threads(previous)
        fastvae.set_backend(None)
        _backend._torch_ops.cache_clear()
    for name, (out, grads) in expected.items():
        torch.testing.assert_close(got[name][0], out, msg=f"{path} {name}")
        for a, b in zip(got[name][1], grads):
            torch.testing.assert_close(a, b, msg=f"{path} {name} gradient")


def test_cpp_likelihoods_read_half_precision_decoder_outputs():
    """bfloat16 (as its uint16 bits) and float16 logits with float32 x and out
    run as they are; anything else beside them names the argument."""
    from fastvae import _C

    x, out = torch.zeros(2, 3).numpy(), torch.full((4, 2), float("nan")).numpy()
    for logits in (torch.zeros(4, 2, 3, dtype=torch.bfloat16).view(torch.uint16).numpy(),
                   torch.zeros(4, 2, 3, dtype=torch.float16).numpy()):
        _C.bernoulli_log_prob_forward(x, logits, out, 1)
        assert abs(out + 3 * math.log(2)).max() < 1e-6  # three logits of 0: log(1/2) each
        with pytest.raises(TypeError, match="x: expected dtype float32"):
            _C.bernoulli_log_prob_forward(x.astype("float64"), logits, out, 1)
        with pytest.raises(TypeError, match="out: expected dtype float32"):
            _C.bernoulli_log_prob_forward(x, logits, out.astype("float64"), 1)


def _setup_function(name: str):
    """A function of setup.py, defined alone (setup.py builds when run)."""
    import ast
    import hashlib
    import json
    import subprocess
    import sysconfig
    from pathlib import Path

    source = (Path(__file__).parent.parent / "setup.py").read_text()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name)
    space = {"json": json, "subprocess": subprocess, "sys": sys, "os": os, "hashlib": hashlib,
             "sysconfig": sysconfig}
    exec(compile(ast.Module([node], []), "setup.py", "exec"), space)
    return space


@pytest.mark.skipif(INTERPRET or sys.platform == "win32", reason="main process; a shell script stands in for Python")
def test_setup_builds_the_operators_with_the_installed_torch_and_stops_on_a_broken_one(tmp_path, monkeypatch):
    """setup.py's torch probe: the installed torch's include and library dirs
    and ABI flag; None where torch is missing (or no interpreter answers),
    the build then goes on without the eager CPU operators; an installed torch
    that fails to answer stops the build with its error and the way out,
    FASTVAE_TORCH_OPS=0, rather than quietly building without them."""
    space = _setup_function("installed_torch")
    import torch.utils.cpp_extension as cpp

    includes, libraries, abi, version = space["installed_torch"]()
    assert includes == cpp.include_paths() and libraries == cpp.library_paths()
    assert abi == int(torch._C._GLIBCXX_USE_CXX11_ABI) and version == torch.__version__

    def interpreter(stderr: str):
        script = tmp_path / "python"
        script.write_text(f"#!/bin/sh\necho \"{stderr}\" >&2\nexit 1\n")
        script.chmod(0o755)
        monkeypatch.setattr(sys, "executable", str(script))

    interpreter("ModuleNotFoundError: No module named 'torch'")
    assert space["installed_torch"]() is None
    interpreter("ImportError: libtorch_cpu.so: cannot open shared object file")
    with pytest.raises(RuntimeError, match=r"(?s)FASTVAE_TORCH_OPS=0.*libtorch_cpu\.so: cannot open"):
        space["installed_torch"]()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    assert space["installed_torch"]() is None


@pytest.mark.skipif(INTERPRET, reason="main process")
def test_setup_recompiles_an_object_only_when_what_it_includes_changed(tmp_path):
    """setup.py's stale: a kept object is compiled again when its source, any
    header of the repository, or (a generated unit) a file it includes is
    newer than it; otherwise the second build reuses it."""
    space = _setup_function("stale")
    files = {name: tmp_path / name for name in ("kernel.cpp", "kernel.o", "header.h", "unit.cpp", "member.cpp")}
    for t, name in enumerate(("kernel.cpp", "header.h", "member.cpp", "unit.cpp", "kernel.o")):
        files[name].write_text("")
        os.utime(files[name], (100 + t, 100 + t))
    space["HEADERS"] = [str(files["header.h"])]
    space["UNIT_FILES"] = {str(files["unit.cpp"]): [str(files["member.cpp"])]}
    obj = str(files["kernel.o"])
    assert not space["stale"](obj, str(files["kernel.cpp"]))
    assert not space["stale"](obj, str(files["unit.cpp"]))
    os.utime(files["member.cpp"], (200, 200))  # a file the unit includes changed: the unit only
    assert space["stale"](obj, str(files["unit.cpp"])) and not space["stale"](obj, str(files["kernel.cpp"]))
    os.utime(files["header.h"], (300, 300))  # a header changed: every object
    assert space["stale"](obj, str(files["kernel.cpp"]))
    os.utime(obj, (400, 400))
    os.utime(files["kernel.cpp"], (500, 500))  # the source itself changed
    assert space["stale"](obj, str(files["kernel.cpp"])) and not space["stale"](obj, str(files["unit.cpp"]))


@pytest.mark.skipif(INTERPRET, reason="main process")
def test_setup_keeps_one_build_directory_per_configuration(monkeypatch):
    """setup.py's build_key names the kept build directory: the same for the
    same configuration (pybind11 in a new temporary build environment each
    time included), another for other flags (FASTVAE_SANITIZE=1), another
    torch, another source list or another compiler."""
    from types import SimpleNamespace

    space = _setup_function("build_key")

    def key(env="/tmp/pip-build-env-a", torch_version="2.13.0", flags=("-O3",), sources=("csrc/a.cpp",), cxx=None):
        monkeypatch.setitem(sys.modules, "pybind11", SimpleNamespace(
            get_include=lambda: f"{env}/site-packages/pybind11/include", __version__="3.1.0"))
        if cxx:
            monkeypatch.setenv("CXX", cxx)
        else:
            monkeypatch.delenv("CXX", raising=False)
        ext = SimpleNamespace(sources=list(sources), extra_compile_args=list(flags), extra_link_args=["-fopenmp"],
                              define_macros=[], libraries=["torch"], library_dirs=["/venv/torch/lib"],
                              runtime_library_dirs=["/venv/torch/lib"],
                              include_dirs=["csrc", f"{env}/site-packages/pybind11/include"])
        return space["build_key"](ext, torch_version)

    assert key() == key(env="/tmp/pip-build-env-b")
    assert len({key(), key(flags=("-O3", "-fsanitize=address,undefined")), key(torch_version="2.14.0"),
                key(sources=("csrc/a.cpp", "csrc/b.cpp")), key(cxx="clang++")}) == 5


def test_compiling_covers_what_is_compiling_misses():
    """_backend.compiling(): False in eager mode; True inside an opaque call's
    function and under a fake tensor mode (AOT autograd's trace), where
    torch.compiler.is_compiling() is False on torch before 2.13."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastvae import _op, _opaque

    assert not _backend.compiling()
    _op.OPAQUE["_test_probe"] = lambda: _backend.compiling()
    try:
        assert _opaque._call("_test_probe", ())
    finally:
        del _op.OPAQUE["_test_probe"]
    assert _backend.opaque_depth == 0 and not _backend.compiling()
    with FakeTensorMode():
        assert _backend.compiling()
    assert not _backend.compiling()


@pytest.mark.skipif(INTERPRET, reason="main process")
def test_spinning_threads_on_a_busy_machine_warn_once_at_the_first_cpu_call(monkeypatch):
    """torch loaded before fastvae (no policy set here), no wait policy in the
    environment, 2 threads, a load average above what the cores leave: the
    first call on CPU tensors warns once (ThreadsWarning, at the user's line)
    with the remedies; a policy in the environment, 1 thread, an idle machine
    or fastvae imported first give no warning."""
    from fastvae import _openmp

    monkeypatch.setattr(_openmp, "POLICY_SET_HERE", False)
    monkeypatch.setattr(_openmp, "_warned", False)
    for name in _openmp._WAIT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.5, 3.0, 2.0), raising=False)
    monkeypatch.setattr(_openmp, "_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(_backend, "_chosen", {})
    mu = torch.zeros(2, 3)
    with pytest.warns(fastvae.ThreadsWarning, match=r"load average 3.5 on 2 cores.*OMP_WAIT_POLICY=passive") as w:
        fastvae.kl_normal(mu, mu)
    assert w[0].filename == __file__
    _backend._chosen.clear()  # the backend's choice again (set_backend clears it): still once per process
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastvae.kl_normal(mu, mu)
    assert _openmp.spinning_cost() is not None
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0), raising=False)  # only this process runs
    assert _openmp.spinning_cost() is None
    monkeypatch.setattr(os, "getloadavg", lambda: (3.5, 3.0, 2.0), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert _openmp.spinning_cost() is None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    assert _openmp.spinning_cost() is None
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(_openmp, "POLICY_SET_HERE", True)
    assert _openmp.spinning_cost() is None


@pytest.mark.skipif(INTERPRET, reason="main process")
def test_fastvae_imported_first_makes_openmp_threads_wait_passively():
    """fastvae/_openmp.py: imported before torch, fastvae sets OMP_WAIT_POLICY=PASSIVE
    for the OpenMP runtime torch then loads; it keeps a policy the environment
    set, and changes nothing once torch is loaded (the runtime has read it)."""
    import subprocess

    def policy(code: str, **env) -> str:
        environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
        out = subprocess.run([sys.executable, "-c", code + "; import os; print(os.environ.get('OMP_WAIT_POLICY'))"],
                             env=environ, capture_output=True, text=True, check=True)
        return out.stdout.split()[-1]

    assert policy("import fastvae") == "PASSIVE"
    assert policy("import fastvae", OMP_WAIT_POLICY="active") == "active"
    assert policy("import torch, fastvae") == "None"
