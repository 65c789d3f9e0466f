"""Shared by the tests of bernoulli_log_prob and continuous_bernoulli_log_prob
(one front end and one kernel per backend, with the formula as a variant):
random problems, the comparison against the float64 reference, and the check
that dx of x broadcast over K comes out the same twice."""
import math

import torch
from hypothesis import strategies as st

from helpers import assert_close


@st.composite
def problems(draw, dims, bounds):
    """x (*batch, D) against logits (K, *batch, D) (no K: logits of x's shape),
    logits uniform in +-bound, at most about 12000 elements."""
    D = draw(st.sampled_from(dims))
    batch = tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=2)))
    K = draw(st.sampled_from([None, 1, 2, 5]))
    while math.prod(batch) * (K or 1) * D > 12000 and batch:
        batch = batch[1:]
    return dict(D=D, batch=batch, K=K, x_kind=draw(st.sampled_from(["binary", "unit"])),
                bound=draw(st.sampled_from(bounds)), x_grad=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


def check_against_reference(p, dtype, device, op, ref_op, terms):
    """Value and gradients (dx when p asks for it) of ``op`` against the float64
    ``ref_op``; terms(x64, l64) bounds the size of the terms behind each value."""
    g = torch.Generator().manual_seed(p["seed"])
    D, batch, K = p["D"], p["batch"], p["K"]
    out_shape = (*(() if K is None else (K,)), *batch, D)
    x = torch.rand((*batch, D), generator=g, dtype=torch.float64)
    if p["x_kind"] == "binary":
        x = (x > 0.5).double()
    logits = (torch.rand(out_shape, generator=g, dtype=torch.float64) * 2 - 1) * p["bound"]
    x = x.to(dtype).to(device).requires_grad_(p["x_grad"])
    logits = logits.to(dtype).to(device).requires_grad_()
    inputs = [t for t in (x, logits) if t.requires_grad]

    out = op(x, logits)
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, up.to(dtype).to(device))

    x64 = x.detach().double().cpu().requires_grad_(p["x_grad"])
    l64 = logits.detach().double().cpu().requires_grad_()
    ref = ref_op(x64, l64)
    ref_grads = torch.autograd.grad(ref, [t for t in (x64, l64) if t.requires_grad], up.to(dtype).double())
    assert out.shape == ref.shape
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)  # never a half-precision bound
    assert_close(out, ref.detach(), terms(x64.detach(), l64.detach()).sum(-1), "log_prob")
    for t, got, want in zip(inputs, grads, ref_grads):
        # dlogits = up (x - E[x]) is bounded by |up|; dx = sum_k up l grows with |l|
        scale = up.abs()[..., None] * ((1.0 + l64.detach().abs()) if t is x else torch.ones_like(l64))
        while scale.dim() > want.dim():
            scale = scale.sum(0)
        assert_close(got, want, scale, "dx" if t is x else "dlogits")
    return out, grads


def check_dx_twice(K, batch, D, device, op, ref_op, terms):
    """dx of x broadcast over K against the reference, and a second call with
    the same bits (the Triton split's arrival counters are back at 0)."""
    p = dict(D=D, batch=batch, K=K, x_kind="unit", bound=3.0, x_grad=True, seed=D)
    out, grads = check_against_reference(p, torch.float32, device, op, ref_op, terms)
    again, grads_again = check_against_reference(p, torch.float32, device, op, ref_op, terms)
    assert torch.equal(out, again)
    for a, b in zip(grads, grads_again):
        assert torch.equal(a, b)
