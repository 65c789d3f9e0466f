"""Comparison against the float64 reference with a per-element, condition-aware
tolerance: |actual - expected| <= rtol * scale, where scale bounds the size of
the terms that produced the value (so a sum of large terms that cancels is
judged against the terms, not against its small result). NaN never passes."""
import torch

# Relative tolerance per dtype of the tensor under test (computed from the
# float64 reference, so this is the kernel's own rounding error).
RTOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


def assert_close(actual, expected, scale, name=""):
    rtol = RTOL[actual.dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    s = scale.detach().double().cpu().expand_as(e)
    assert not torch.isnan(a).any(), f"{name}: NaN at {torch.isnan(a).nonzero()[:5].tolist()}"
    assert torch.isfinite(e).all(), f"{name}: reference is not finite (bad test input)"
    # tiny floor for the output dtype's smallest normal numbers
    tiny = torch.finfo(actual.dtype).tiny
    err = (a - e).abs()
    bound = rtol * s + tiny
    bad = ~(err <= bound)
    if bad.any():
        i = int(torch.argmax((err / bound).flatten()))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} elements off; worst at flat index {i}: "
            f"actual {a.flatten()[i].item()!r}, expected {e.flatten()[i].item()!r}, "
            f"error {err.flatten()[i].item():.3e} > bound {bound.flatten()[i].item():.3e}"
        )


def seed_tensor(value, device):
    return torch.tensor(value, dtype=torch.int64, device=device)


def gen(seed):
    """A CPU torch.Generator seeded with ``seed``, for generator= arguments."""
    return torch.Generator().manual_seed(seed)


def philox_seed_of(gen_seed):
    """The Philox seed a call with generator=gen(gen_seed) draws."""
    from fastvae._op import draw_seed

    return int(draw_seed(torch.device("cpu"), gen(gen_seed)))


def run_gloo_ranks(script, args_of_rank, tmp_path, n=2, timeout=180):
    """Runs ``python -c script rank n init *args_of_rank(rank)`` for n gloo
    ranks on this machine (cpp backend, one thread each) and fails with the
    ranks' output if any exits non-zero."""
    import os
    import subprocess
    import sys

    init = f"file://{tmp_path / 'rendezvous'}"
    env = dict(os.environ, FASTVAE_BACKEND="cpp", OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # no dependence on the hostname resolving
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), str(n), init, *args_of_rank(r)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(n)]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]


def assert_compiled_matches_eager(fn, args, params, *, torch_seed=0, rtol=1e-5, atol=1e-5, grad_rtol=1e-4):
    """fn(*args) under torch.compile(fullgraph=True) gives eager's values and
    gradients w.r.t. params (the same torch seed before each run, so the same
    Philox seed is drawn). fn returns a scalar loss or (loss, *extra outputs)."""
    def run(f):
        torch.manual_seed(torch_seed)
        out = f(*args)
        outs = out if isinstance(out, tuple) else (out,)
        return outs, torch.autograd.grad(outs[0], params)

    torch._dynamo.reset()
    eager, eager_grads = run(fn)
    compiled, compiled_grads = run(torch.compile(fn, fullgraph=True))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=grad_rtol, atol=atol)
