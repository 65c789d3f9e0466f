"""stick_breaking, described once: z = stick_breaking(y) on the simplex of
M + 1 components for y (..., M), torch's StickBreakingTransform in log space
(the logistic-normal posterior's transform, fastvae/latents.py). With
x_j = y_j - log(M - j) and S_j = sum_{i <= j} softplus(x_i):
log z_j = x_j - S_j (j < M), log z_M = -S_{M-1}. Backward, with
g_j = dz_j z_j and R_j = sum_{i >= j} g_i (over all M + 1):
dy_j = g_j - sigmoid(x_j) R_j.

The op's description and its oracle (fastvae/ops/__init__.py lists the
folder's files).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..._dtypes import accumulation_dtype
from ..._spec import Bench, Kernel, Op

KERNELS = (
    Kernel("stick_breaking_forward", "stick_breaking", ("y", "z")),
    Kernel("stick_breaking_backward", "stick_breaking", ("grad_z", "y", "z", "dy")),
)

OP = Op("stick_breaking", tuple(k.name for k in KERNELS), "fastvae/ops/stick_breaking/test_stick_breaking.py",
        "stick_breaking", torch_ops=("stick_breaking",), triton_ops=("stick_breaking", "stick_breaking_backward"))


# -- the oracle ------------------------------------------------------------------


def _x(y: Tensor) -> Tensor:
    """x_j = y_j - log(M - j): the offsets that make y = 0 the simplex's centre."""
    M = y.shape[-1]
    return y - torch.arange(M, 0, -1, dtype=y.dtype, device=y.device).log()


def _softplus(x: Tensor) -> Tensor:
    """softplus(x) = max(x, 0) + log1p(exp(-|x|)): exact for every x (torch's
    returns x itself above 20, off by e^-20 = 2e-9, which float64 sees), and
    finite for finite x; -inf gives 0, +inf gives inf."""
    return x.clamp(min=0.0) + torch.log1p(torch.exp(-x.abs()))


def stick_breaking(y: Tensor) -> Tensor:
    """z (..., M + 1) = stick_breaking(y (..., M)), in log space, so that
    y_j = -inf gives z_j = 0 and a large y_j gives z_j = 1 (y_j = +inf: NaN,
    inf - inf, as torch's transform in log space). Differentiable (its
    gradient: stick_breaking_grad, the same except at x_j = 0 exactly, where
    autograd takes a one-sided derivative of |x|)."""
    x = _x(y)
    S = torch.cumsum(_softplus(x), -1)
    return torch.cat((x - S, -S[..., -1:]), -1).exp()


def stick_breaking_grad(grad_z: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """dy for the gradient grad_z (..., M + 1) of z = stick_breaking(y):
    g_j = grad_z_j z_j, R_j = sum_{i >= j} g_i, dy_j = g_j - sigmoid(x_j) R_j.
    The one Python copy of the backward formula: the reference backend's
    stick_breaking_backward and the op's create_graph=True backward (its
    op.py) call it; plain differentiable torch ops, in y and in z."""
    M = y.shape[-1]
    g = grad_z * z
    # the suffix sums as such: total - prefix + g_j cancels to nothing beside
    # a large g_0 (a row whose first stick takes nearly all of it)
    R = g.flip(-1).cumsum(-1).flip(-1)[..., :M]
    return g[..., :M] - torch.sigmoid(_x(y)) * R


def stick_breaking_forward(y, z) -> None:
    z.copy_(stick_breaking(y.to(accumulation_dtype(y.dtype))))


def stick_breaking_backward(grad_z, y, z, dy) -> None:
    acc = accumulation_dtype(y.dtype)
    dy.copy_(stick_breaking_grad(grad_z.to(acc), y.to(acc), z.to(acc)))


# -- ahead-of-time compilation (python -m fastvae.kernels.aot --op stick_breaking) -----


def aot_calls(s: dict, m, r):
    """(kernel, arguments) of every launch the op makes at shape s (B rows of
    L = M); m makes a tensor of the input dtype (kernels/aot.py)."""
    B, L = s["B"], s["L"]
    yield "stick_breaking_forward", dict(y=m(B, L), z=m(B, L + 1))
    yield "stick_breaking_backward", dict(grad_z=m(B, L + 1), y=m(B, L), z=m(B, L + 1), dy=m(B, L))


# -- the benchmark row (python -m benchmarks.bench_op stick_breaking) ------------


def _bench_inputs(size: dict, device):
    B, L = size["B"], size["L"]
    g = torch.Generator(device="cpu").manual_seed(0)
    y = torch.randn(B, L, generator=g).to(device).requires_grad_()
    return (y,), [y], (torch.randn(B, L + 1, generator=g).to(device),)


def _bench_min_bytes(size: dict, itemsize: int = 4) -> dict[str, int]:
    B, L = size["B"], size["L"]
    fwd = (B * L + B * (L + 1)) * itemsize  # y -> z
    bwd = (2 * B * (L + 1) + 2 * B * L) * itemsize  # dz, z, y -> dy
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


# (100, 8): the per-call cost; (4096, 32): the logistic-normal ELBO's size;
# (65536, 32): bandwidth
BENCH = Bench("stick_breaking, float32", sizes=({"B": 100, "L": 8}, {"B": 4096, "L": 32}, {"B": 65536, "L": 32}),
              quick=({"B": 100, "L": 8}, {"B": 4096, "L": 32}), inputs=_bench_inputs, eager=stick_breaking,
              min_bytes=_bench_min_bytes, fastvae="stick_breaking")
