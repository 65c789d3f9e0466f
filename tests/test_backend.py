"""Backend choice, the FASTVAE_BACKEND override and the missing-extension message."""
import math
import os
import sys

import pytest
import torch

import fastvae
from fastvae import _backend, _registry

from conftest import INTERPRET

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

    for mod in [m for m in list(sys.modules) if m.startswith("fastvae.kernels")]:
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
