"""Comparison against the float64 reference with a per-element, condition-aware
tolerance: |actual - expected| <= rtol * scale, where scale bounds the size of
the terms that produced the value (so a sum of large terms that cancels is
judged against the terms, not against its small result). NaN never passes."""
import functools
import math
import re

import pytest
import torch
from hypothesis import given, settings

from fastvae.objectives import DREG_COMPILES

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


def grads_and_float64_leaves(out, inputs, seed, dtype, device):
    """(g, grads, leaves, as64) of a check against the float64 oracle: g, a
    float64 incoming gradient drawn from ``seed``; grads, out's gradients in
    ``inputs`` given g in ``dtype``; leaves, a float64 CPU leaf of each input
    by id; as64(t), t's leaf (t itself in float64 where it is not an input;
    None for None)."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, g.to(dtype).to(device))
    leaves = {id(t): t.detach().double().cpu().requires_grad_() for t in inputs}
    as64 = lambda t: None if t is None else leaves.get(id(t), t.detach().double().cpu())  # noqa: E731
    return g, grads, leaves, as64


def summed_like(elem, want):
    """elem (K, ..., D), per-element error scales, summed down to the shape of
    the gradient ``want`` (summed over samples and rows, per dimension, or a
    scalar): the error scale of a gradient that sums elem's terms."""
    scale = elem
    while scale.dim() > max(want.dim(), 1):
        scale = scale.sum(0)
    if want.dim() <= 1 and scale.shape != want.shape:
        scale = scale.reshape(-1, scale.shape[-1]).sum(0)
        scale = scale.sum() if want.dim() == 0 else scale
    return scale


def reference_tests(check, problems, half_examples=8, float16_caps=None, half_problem=None):
    """An op's two Hypothesis tests against its float64 oracle, for a test
    module to bind: check(problem, dtype, device) on float32 and float64
    inputs, and on bfloat16 and float16 ones with ``half_examples`` examples;
    float16_caps {key: bound} caps those keys of a float16 problem (where a
    gradient's 1 / variance must fit float16's 65504), and half_problem(problem)
    gives the problem both half dtypes take instead."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @given(p=problems)
    def test_forward_backward_match_reference(backend, dtype, p):
        check(p, dtype, backend[1])

    @settings(max_examples=half_examples)
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @given(p=problems)
    def test_half_precision_matches_reference(backend, dtype, p):
        """The problems in half precision: float32 results (gradients in the
        inputs' dtype) against the float64 oracle of the same rounded inputs."""
        if half_problem is not None:
            p = half_problem(p)
        if dtype == torch.float16 and float16_caps:
            p = dict(p, **{k: min(p[k], bound) for k, bound in float16_caps.items()})
        check(p, dtype, backend[1])

    return test_forward_backward_match_reference, test_half_precision_matches_reference


def half_precision_leaves(dtype, x_dtype, device, x, *params):
    """The leaves of a half-precision likelihood check, from float32 draws: x in
    ``x_dtype`` ("same": ``dtype``; float32 as under autocast), the
    distribution's parameters in ``dtype``."""
    x_dtype = dtype if x_dtype == "same" else x_dtype
    return x.to(x_dtype).to(device).requires_grad_(), *(t.to(dtype).to(device).requires_grad_() for t in params)


def assert_refuses_bad_x(log_prob, param, device, shape, dtype):
    """log_prob(x, param) with an x of ``shape`` (not param's rows), or of
    ``dtype`` (one it cannot read): errors that name x's shape and the dtype."""
    with pytest.raises(ValueError, match=r"x of shape \(" + ", ".join(map(str, shape)) + r"\)"):
        log_prob(torch.zeros(shape, device=device), param)
    with pytest.raises(TypeError, match="x must .*got dtype " + re.escape(str(dtype))):
        log_prob(torch.zeros(param.shape[-2:], dtype=dtype, device=device), param)


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


# estimator="dreg" under torch.compile needs torch >= 2.13 (fastvae.objectives.DREG_COMPILES says why;
# before, fastvae raises a clear error, which test_compile.py checks)
NEEDS_DREG_COMPILE = pytest.mark.skipif(
    not DREG_COMPILES, reason="estimator='dreg' under torch.compile needs torch >= 2.13")


def dreg_compile_cases(cases):
    """cases, those that name "dreg" marked NEEDS_DREG_COMPILE."""
    return [pytest.param(c, marks=NEEDS_DREG_COMPILE) if "dreg" in c else c for c in cases]


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


# -- decoders that fold the samples into the batch ------------------------------

FOLDED_FORMS = ("mean", "mean_logvar", "mean_channel_logvar", "normal", "independent_normal", "logits",
                "bernoulli_probs", "continuous_bernoulli", "categorical", "poisson", "negative_binomial", "zinb",
                "mixture_packed", "mixture_tuple")
# The view happens before any kernel runs, so the Triton interpreter child (about
# 1 ms a program, 40 s for the mixture forms alone) checks two forms that reach
# its kernels; the main process checks them all on the reference and C++ backends.
INTERPRETER_FOLDED_FORMS = ("mean_logvar", "bernoulli_probs")


def folded_decoder_case(form, device, B=3, L=2, seed=0):
    """(x, likelihood, decode, folded_decode) for one decoder output form on
    image-shaped x (B, C, H, W): decode honours the (..., L) -> (..., *event)
    contract, folded_decode runs the same network on z.reshape(-1, L) and
    returns its (S·B, *event) rows as they are (a conv decoder's habit). Both
    compute the same numbers, so the objectives must agree bit for bit."""
    import torch.distributions as dist

    g = torch.Generator().manual_seed(seed)
    C, H, W = (3, 2, 2) if form.startswith("mixture") else (2, 3, 2)
    M = 2
    if form == "categorical":
        x = torch.randint(0, 4, (B, C, H, W), generator=g)
    elif form in ("poisson", "negative_binomial", "zinb"):
        x = torch.randint(0, 6, (B, C, H, W), generator=g).double()
    elif form.startswith("mixture"):
        x = torch.randint(0, 256, (B, C, H, W), generator=g).double() / 127.5 - 1
    elif form in ("logits", "bernoulli_probs", "continuous_bernoulli"):
        x = torch.rand(B, C, H, W, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    event = (C, H, W)
    pieces = {  # per-example shape of each output tensor
        "categorical": [(*event, 4)],
        "mean_logvar": [event, event], "normal": [event, event], "independent_normal": [event, event],
        "negative_binomial": [event], "zinb": [event, event, event],
        "mixture_packed": [(10 * M, H, W)], "mixture_tuple": [(M, H, W), (M, C, H, W), (M, C, H, W)],
    }.get(form, [event])
    sizes = [math.prod(p) for p in pieces]
    weight = (torch.randn(L, sum(sizes), generator=g, dtype=torch.float64) * 0.5).to(device)
    channel_logvar = (torch.randn(C, 1, 1, generator=g, dtype=torch.float64) * 0.3).to(device)
    gene_theta = torch.randn(*event, generator=g, dtype=torch.float64).to(device)  # per element of one example

    def finish(parts):
        if form == "mean":
            return parts[0]
        if form == "mean_logvar":
            return parts[0], parts[1] * 0.3
        if form == "mean_channel_logvar":
            return parts[0], channel_logvar
        if form == "normal":
            return dist.Normal(parts[0], (parts[1] * 0.15).exp())
        if form == "independent_normal":
            return dist.Independent(dist.Normal(parts[0], (parts[1] * 0.15).exp()), 3)
        if form == "bernoulli_probs":
            return dist.Bernoulli(probs=torch.sigmoid(parts[0]))
        if form == "negative_binomial":
            return parts[0], gene_theta
        if form == "zinb":
            return parts[0], parts[1], parts[2]
        if form == "mixture_tuple":
            return parts[0], parts[1].tanh(), parts[2] * 0.2 - 2
        return parts[0]

    def run(z, fold):
        flat = z.reshape(-1, z.shape[-1]) @ weight  # (N, sum(sizes)): the net sees a flat batch
        parts = [p.reshape(-1, *shape) for p, shape in zip(flat.split(sizes, -1), pieces)]
        if not fold:
            parts = [p.unflatten(0, z.shape[:-1]) for p in parts]
        return finish(parts)

    likelihood = {"mean": "gaussian", "mean_logvar": "gaussian", "mean_channel_logvar": "gaussian",
                  "logits": "bernoulli", "continuous_bernoulli": "continuous_bernoulli",
                  "categorical": "categorical", "poisson": "poisson", "negative_binomial": "negative_binomial",
                  "zinb": "zinb", "mixture_packed": "discretized_logistic_mixture",
                  "mixture_tuple": "discretized_logistic_mixture"}.get(form)  # None: the distribution implies it
    return x.to(device), likelihood, (lambda z: run(z, False)), (lambda z: run(z, True))


# The case functions each op in a folder of its own defines in its test module
# (fastvae/ops/<op>/test_<op>.py) for the checks that run over every op.
OP_CASES = ("launch_case", "thread_count_calls", "fallback_call", "double_backward_cases", "compile_cases",
            "twin_op_cases")


def op_cases(kind: str) -> dict:
    """op name -> its case function ``kind`` (one of OP_CASES), for every op in
    an op folder whose test module defines one (an op with no C++ operator has
    no compile_cases or twin_op_cases; tests/test_registry.py checks the rest).
    A family's folder (several ops) gives one function of each kind; those of
    PER_OP_CASES return {op name: its case}, the others all the family's cases,
    listed here under the folder's name."""
    import importlib

    from fastvae import _registry

    assert kind in OP_CASES, kind
    found = {}
    for name in _registry.FOLDERS:
        module = importlib.import_module(f"fastvae.ops.{name}.test_{name}")
        if not hasattr(module, kind):
            continue
        cases, ops = getattr(module, kind), _registry.folder_ops(name)
        if len(ops) == 1 or kind not in PER_OP_CASES:  # a one-op folder is named after its op
            found[name] = cases
        else:
            found.update((op.name, functools.partial(_family_case, cases, op.name)) for op in ops)
    return found


# the case functions that give one op's case (or calls): a family's give {op name: it}
PER_OP_CASES = ("launch_case", "thread_count_calls", "fallback_call")


def _family_case(cases, name, *args):
    return cases(*args)[name]
