"""categorical_log_prob against its float64 oracle
(fastvae/ops/categorical_log_prob/__init__.py), per backend (the root
conftest.py), and against torch.distributions.Categorical; and its cases of
the suite-wide checks."""
import math

import pytest
import torch
from hypothesis import strategies as st

import fastvae
from fastvae.ops import categorical_log_prob as oracle
from fastvae.ops.categorical_log_prob import op as categorical_module
from fastvae.ops.categorical_log_prob.op import (
    CategoricalLogProb,
    categorical_log_prob_backward_op,
    categorical_log_prob_op,
)

from conftest import INTERPRET
from helpers import (
    assert_close,
    needs_plan_triton,
    op_plans_match_the_general_launch,
    plan_device_fixture,
    reference_tests,
)

DIMS = [1, 2, 3, 17, 64, 100]
CLASSES = [1, 2, 3, 10, 256, 1025, 3000]  # 3000: several class tiles of the Triton kernels


@st.composite
def problems(draw):
    C = draw(st.sampled_from(CLASSES))
    D = draw(st.sampled_from(DIMS))
    batch = tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=2)))
    K = draw(st.sampled_from([None, 1, 2, 5]))
    while math.prod(batch) * (K or 1) * D * C > 40000 and (batch or D > 1):
        if batch:
            batch = batch[1:]
        else:
            D = max(1, D // 4)
    return dict(C=C, D=D, batch=batch, K=K, bound=draw(st.sampled_from([0.5, 5.0, 50.0, 1e4])),
                masked=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def make(p, dtype, device):
    """x (*batch, D) int64 and logits (K?, *batch, D, C) in dtype; with
    p["masked"], some logits are -inf (classes of probability 0), among them a
    few picked ones (log-probability -inf would make every sum -inf: only in
    rows' classes that x does not pick)."""
    g = torch.Generator().manual_seed(p["seed"])
    C, D, batch, K = p["C"], p["D"], p["batch"], p["K"]
    lead = (*(() if K is None else (K,)), *batch)
    x = torch.randint(0, C, (*batch, D), generator=g)
    logits = (torch.rand((*lead, D, C), generator=g, dtype=torch.float64) * 2 - 1) * p["bound"]
    if p["masked"] and C > 1:
        drop = torch.rand(logits.shape, generator=g) < 0.3
        drop &= torch.arange(C) != x.expand(logits.shape[:-1])[..., None]  # never the picked class
        logits = logits.masked_fill(drop, -math.inf)
    return x.to(device), logits.to(dtype).to(device), g


def check_against_reference(p, dtype, device):
    x, logits, g = make(p, dtype, device)
    logits.requires_grad_()
    out = fastvae.categorical_log_prob(x, logits)
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (dl,) = torch.autograd.grad(out, [logits], up.to(dtype).to(device))

    l64 = logits.detach().double().cpu().requires_grad_()
    ref = oracle.categorical_log_prob(x.cpu(), l64)
    (ref_dl,) = torch.autograd.grad(ref, [l64], up.to(dtype).double())
    assert out.shape == ref.shape == logits.shape[:-2]
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    finite = l64.detach().nan_to_num(neginf=0.0)
    # the size of the terms: the picked logit and the log-sum-exp (its max and log C)
    lse = torch.logsumexp(l64.detach(), -1)
    terms = (finite.abs().amax(-1) + lse.abs() + math.log(p["C"]) + 1.0).sum(-1)
    assert_close(out, ref.detach(), terms, "log_prob")
    assert_close(dl, ref_dl, up.abs()[..., None, None].expand(ref_dl.shape), "dlogits")
    return out, dl


# float16 tops out at 65504
test_forward_backward_match_reference, test_half_precision_matches_reference = reference_tests(
    check_against_reference, problems(), float16_caps={"bound": 5e3})


@pytest.mark.parametrize("K,batch,D,C", [(1, (1,), 1, 2), (3, (5,), 7, 2), (2, (3,), 5, 4000), (None, (4,), 1, 1)])
def test_odd_shapes_and_repeatable(backend, K, batch, D, C):
    """K = 1, one row, C = 2, C = 1 (log-probability 0), C past the class tiles:
    the same bits on a second call."""
    p = dict(C=C, D=D, batch=batch, K=K, bound=3.0, masked=False, seed=C + D)
    out, dl = check_against_reference(p, torch.float32, backend[1])
    again, dl_again = check_against_reference(p, torch.float32, backend[1])
    assert torch.equal(out, again) and torch.equal(dl, dl_again)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_distributions(backend, dtype):
    """Equal to Independent(Categorical(logits), 1).log_prob(x), and to
    Categorical(probs).log_prob(x) summed over D, values and gradients."""
    _, device = backend
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 11, (4, 9), generator=g)
    logits = torch.randn(3, 4, 9, 11, generator=g, dtype=torch.float64) * 3
    ld = logits.to(dtype).to(device).requires_grad_()
    out = fastvae.categorical_log_prob(x.to(device), ld)
    l64 = logits.clone().requires_grad_()
    peer = torch.distributions.Independent(torch.distributions.Categorical(logits=l64), 1).log_prob(x)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.double().cpu(), peer.detach(), **tol)
    (dl,) = torch.autograd.grad(out.sum(), [ld])
    (dpeer,) = torch.autograd.grad(peer.sum(), [l64])
    torch.testing.assert_close(dl.double().cpu(), dpeer, **tol)
    probs = torch.softmax(logits, -1)
    by_probs = torch.distributions.Categorical(probs=probs).log_prob(x).sum(-1)
    torch.testing.assert_close(fastvae.categorical_log_prob(x.to(device), probs.log().to(dtype).to(device))
                               .double().cpu(), by_probs, **tol)


def test_masked_and_impossible_classes(backend):
    """A -inf logit is a class of probability 0: picked, its log-probability is
    -inf with a finite gradient; a row of all -inf has log-probability -inf and
    a zero softmax. Large logits (1e30) cost no precision: no NaN anywhere."""
    _, device = backend
    inf = math.inf
    logits = torch.tensor([[[0.0, -inf, 1.0]], [[-inf, -inf, -inf]], [[1e30, 1e30 - 1e24, -1e30]]],
                          device=device, requires_grad=True)  # (3 samples, D=1, C=3)
    x = torch.tensor([1], device=device)
    out = fastvae.categorical_log_prob(x, logits)
    assert out.shape == (3,) and out[0] == -inf and out[1] == -inf
    want = oracle.categorical_log_prob(x.cpu(), logits.detach().double().cpu()[2])
    torch.testing.assert_close(out[2].double().cpu(), want, rtol=1e-6, atol=0)
    (dl,) = torch.autograd.grad(out.sum(), [logits])
    assert not dl.isnan().any()
    p0 = torch.softmax(torch.tensor([0.0, -inf, 1.0]), 0)
    torch.testing.assert_close(dl[0, 0].cpu(), torch.tensor([0.0, 1.0, 0.0]) - p0)
    assert torch.equal(dl[1, 0].cpu(), torch.tensor([0.0, 1.0, 0.0]))


def test_out_of_range_classes_are_refused(backend):
    """An index outside [0, C) is an error naming x (checked at every call
    under "always"; by default on CPU every call, on the Triton backend the
    first). Unchecked, nothing reads outside a row: the cpp binding refuses
    it, the Triton kernels give NaN for that row, the reference's gather raises."""
    name, device = backend
    logits = torch.zeros(2, 3, 4, 5, device=device)
    fastvae.set_value_checks("always")  # the autouse fixture restores "auto"
    for bad in (5, -1):
        x = torch.zeros(3, 4, dtype=torch.int64, device=device)
        x[1, 2] = bad
        with pytest.raises(ValueError, match=rf"x holds class index {bad}, outside \[0, 5\)"):
            fastvae.categorical_log_prob(x, logits)
    fastvae.set_value_checks("never")
    x[1, 2] = 7
    if name == "cpp":
        with pytest.raises(ValueError, match=r"x: class index 7 at flat position 6 is outside \[0, 5\)"):
            fastvae.categorical_log_prob(x, logits)
    elif name == "triton":
        out = fastvae.categorical_log_prob(x, logits)
        assert out[:, 1].isnan().all() and not out[:, [0, 2]].isnan().any()
    else:
        with pytest.raises(RuntimeError, match="index"):
            fastvae.categorical_log_prob(x, logits)


def test_errors_on_bad_input(backend):
    _, device = backend
    logits = torch.zeros(2, 3, 4, 5, device=device)
    with pytest.raises(TypeError, match="x must be an integer tensor of class indices.*x.long"):
        fastvae.categorical_log_prob(torch.zeros(3, 4, device=device), logits)
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        fastvae.categorical_log_prob(torch.zeros(3, 4, dtype=torch.int64, device=device), logits.long())
    with pytest.raises(ValueError, match=r"x of shape \(3, 5\) does not broadcast"):
        fastvae.categorical_log_prob(torch.zeros(3, 5, dtype=torch.int64, device=device), logits)
    # narrower integer dtypes are read as class indices
    x8 = torch.randint(0, 5, (3, 4), dtype=torch.uint8, device=device)
    torch.testing.assert_close(fastvae.categorical_log_prob(x8, logits),
                               fastvae.categorical_log_prob(x8.long(), logits))


def test_gradcheck_and_double_backward_float64(backend):
    _, device = backend
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (3, 5), generator=g).to(device)
    logits = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) * 2).to(device).requires_grad_()
    # fast_mode (one random projection of the Jacobian) under the interpreter, where each of the full
    # check's evaluations runs interpreted kernels; the main process checks every entry on cpp and reference
    assert torch.autograd.gradcheck(lambda lg: CategoricalLogProb.apply(x, lg), (logits,), fast_mode=INTERPRET)
    assert torch.autograd.gradcheck(lambda lg: CategoricalLogProb.apply(x, lg), (logits[0],), fast_mode=INTERPRET)
    assert torch.autograd.gradgradcheck(lambda lg: fastvae.categorical_log_prob(x, lg), (logits,), fast_mode=INTERPRET)


def test_opcheck(backend):
    _, device = backend
    x = torch.randint(0, 6, (3, 7), device=device)
    logits = torch.randn(2, 3, 7, 6, device=device, requires_grad=True)
    torch.library.opcheck(categorical_log_prob_op, (x, logits))
    torch.library.opcheck(categorical_log_prob_backward_op, (torch.randn(2, 3, device=device), x, logits.detach()))


@pytest.mark.full_interpreted  # a compile interpreted; test_compile_changes.py compiles the Triton path (quick)
def test_compiles_without_graph_breaks(backend):
    _, device = backend
    x = torch.randint(0, 6, (3, 7), device=device)
    logits = torch.randn(2, 3, 7, 6, device=device, requires_grad=True)
    f = torch.compile(fastvae.categorical_log_prob, fullgraph=True)
    torch.testing.assert_close(f(x, logits), fastvae.categorical_log_prob(x, logits))


# -- the op's cases of the suite-wide checks -----------------------------------------
# The checks that run over every op read these (tests/helpers.py, op_cases), so
# that no list outside this folder names the op: test_registry.py fails when
# one is missing.


def launch_case(op, B, L, K, D):
    """tests/test_launches.py: one forward + backward at a training size; ``op``
    makes the call from the function and its leaves' shapes (x: binary classes
    of 3, made without a draw)."""
    x = torch.arange(B * D).reshape(B, D) % 2
    return op(lambda lg: fastvae.categorical_log_prob(x, lg), (K, B, D, 3))


def thread_count_calls(leaf, run):
    """tests/test_backend.py: calls with enough work for several threads, whose
    bits must not depend on the thread count (few x rows against many samples:
    the folded layout)."""
    x, logits = torch.arange(8 * 16).reshape(8, 16) % 3, leaf(500, 8, 16, 4, scale=3)
    return [lambda: run(lambda a: fastvae.categorical_log_prob(x, a), logits)]


def fallback_call(leaf, run):
    """tests/test_backend.py: a small call, run with and without the extension."""
    x, logits = (torch.sigmoid(leaf(2, 4).detach()) * 4).long(), leaf(2048, 2, 16)
    return lambda: run(lambda b: fastvae.categorical_log_prob(x, b.reshape(2048, 2, 4, 4)), logits)


def double_backward_cases(r):
    """tests/test_double_backward.py: name -> (function of the leaves, their
    values, whether a C++ operator serves it) for gradgradcheck; the integer
    classes are no leaf (made on the logits' device)."""
    return {
        "categorical_log_prob": (lambda lg: fastvae.categorical_log_prob(
            torch.arange(15, device=lg.device).reshape(3, 5) % 4, lg), [r(2, 3, 5, 4)], False),
    }


# -- the ops' own calls (a compiled graph's nodes) on the triton backend: OP_PLANS

plan_device = plan_device_fixture(categorical_module)


@needs_plan_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K, P, D, C", [(1, 1, 1, 1), (3, 5, 7, 4), (2, 3, 2, 300)])
def test_the_ops_own_calls_launch_from_plans_with_the_general_bits(plan_device, monkeypatch, dtype, K, P, D, C):
    """fastvae::categorical_log_prob and its backward called as a compiled
    graph calls them (x (P, D) int64, logits (K, P, D, C), contiguous): on
    the triton backend from a plan of the call's signature (OP_PLANS), with
    the general launch's log-likelihood and gradient bit for bit, from the
    first call and the second; one class, odd sizes, C past one class tile,
    a -inf logit off the class picked; half precision, transposed logits, an
    empty batch and a gradient of another dtype take the general launch and
    make no plan."""
    categorical_module.OP_PLANS.clear()
    g = torch.Generator().manual_seed(K + P + D + C)
    x = torch.randint(0, C, (P, D), generator=g).to(plan_device)
    logits = (3 * torch.randn(K, P, D, C, generator=g, dtype=torch.float64)).to(dtype).to(plan_device)
    if C > 1:  # a class of probability 0 that x never picks
        logits[..., (x[0, 0] + 1) % C] = -math.inf
    grad_out = torch.randn(K, P, generator=g, dtype=torch.float64).to(dtype).to(plan_device)

    def calls():
        return categorical_log_prob_op(x, logits), categorical_log_prob_backward_op(grad_out, x, logits)

    op_plans_match_the_general_launch(monkeypatch, categorical_module, calls)
    (plan,) = categorical_module.OP_PLANS.values()
    assert len(plan.launches()) == 2
    categorical_module.OP_PLANS.clear()
    categorical_log_prob_op(x, logits.half())
    if D > 1:
        categorical_log_prob_op(x, logits.transpose(-1, -2).contiguous().transpose(-1, -2))
    categorical_log_prob_op(x[:0], logits[:, :0])
    other = torch.float64 if dtype is torch.float32 else torch.float32
    categorical_log_prob_backward_op(grad_out.to(other), x, logits)
    assert len(categorical_module.OP_PLANS) == 0
