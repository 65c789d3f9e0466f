"""sample_normal_tril, described once: reparameterized samples from a
full-covariance Gaussian q = N(mu, S S^T), z = mu + tril(S) @ eps (K, ..., L),
with the analytic KL(q || N(0, I)) (...), for mu (..., L) and S = scale_tril
(..., L, L), of which only the lower triangle is read; eps is sample_normal's
noise.

The op's description and its oracle, which draws the kernels' noise from the
Philox emulation in fastvae/_philox.py (the one the reference backend serves
too); fastvae/ops/__init__.py lists the folder's files.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..._dtypes import accumulation_dtype
from ..._philox import sample_noise
from ..._spec import Bench, Kernel, Op

KERNELS = (
    Kernel("sample_normal_tril_forward", "sample_normal_tril", ("mu", "scale_tril", "seed", "z", "kl")),
    Kernel("sample_normal_tril_backward", "sample_normal_tril",
           ("grad_z", "grad_kl", "mu", "scale_tril", "seed", "dmu", "dscale_tril")),
)

OP = Op("sample_normal_tril", tuple(k.name for k in KERNELS),
        "fastvae/ops/sample_normal_tril/test_sample_normal_tril.py", "sample_normal_tril", launches=(1, 1, 1),
        triton_ops=("sample_normal_tril", "sample_normal_tril_backward"))


# -- the oracle ------------------------------------------------------------------


def _tril_log_diag(diag: Tensor) -> Tensor:
    """log S_ii as the kernels take it: NaN for a negative or NaN diagonal, -inf for 0."""
    return torch.log(diag)


def _tril_inv_diag(diag: Tensor) -> Tensor:
    """d log S_ii / d S_ii = 1 / S_ii, NaN where S_ii < 0 (the KL is NaN there:
    its gradient must not be a finite number either)."""
    return torch.where(diag < 0, torch.nan, 1.0 / diag)


def sample_normal_tril(mu: Tensor, scale_tril: Tensor, seed: int, n_samples: int) -> tuple[Tensor, Tensor]:
    """z = mu + tril(S) @ eps, shape (n_samples, ..., L), and
    kl = KL(N(mu, S S^T) || N(0, I)) = 0.5 * (|S|_F^2 + |mu|^2 - L - 2 sum_i log S_ii),
    shape (...), for mu (..., L) and S = scale_tril (..., L, L), of which only
    the lower triangle is read. eps is sample_normal's: z[k, ..., l] uses the
    noise at offset k * numel(mu) + (flat row) * L + l.

    Differentiable with plain autograd; computed in the dtype of the inputs.
    """
    L = mu.shape[-1]
    S = torch.tril(scale_tril)
    eps = sample_noise(seed, n_samples, mu.shape, mu.dtype, mu.device)
    z = mu + (S @ eps.unsqueeze(-1)).squeeze(-1)
    diag = torch.diagonal(S, dim1=-2, dim2=-1)
    kl = 0.5 * (S.square().sum((-2, -1)) + mu.square().sum(-1) - L - 2.0 * _tril_log_diag(diag).sum(-1))
    return z, kl


def sample_normal_tril_forward(mu: Tensor, scale_tril: Tensor, seed: int, z: Tensor, kl: Tensor) -> None:
    """Writes sample_normal_tril into z (K, N, L) and kl (N,); mu (N, L), scale_tril (N, L, L)."""
    acc = accumulation_dtype(mu.dtype)
    K = z.shape[0]
    zz, kk = sample_normal_tril(mu.to(acc), scale_tril.to(acc), seed, K)
    z.copy_(zz)
    kl.copy_(kk)


def sample_normal_tril_backward(grad_z: Tensor | None, grad_kl: Tensor | None, mu: Tensor, scale_tril: Tensor,
                                seed: int, dmu: Tensor, dscale_tril: Tensor) -> None:
    """dmu = sum_k grad_z + grad_kl * mu;
    dscale_tril = tril(sum_k grad_z eps^T) + grad_kl * (tril(S) - diag(1 / S_ii)), 0 above the diagonal
    (the KL's term left out where grad_kl is 0 or None, NaN on a negative diagonal;
    grad_z None: z has no gradient)."""
    acc = accumulation_dtype(mu.dtype)
    mu = mu.to(acc)
    S = torch.tril(scale_tril.to(acc))
    d_mu, d_s = torch.zeros_like(mu), torch.zeros_like(S)
    if grad_z is not None:
        grad_z = grad_z.to(acc)
        eps = sample_noise(seed, grad_z.shape[0], mu.shape, acc, mu.device)
        d_mu = grad_z.sum(0)
        d_s = torch.tril(torch.einsum("kni,knj->nij", grad_z, eps))
    if grad_kl is not None:
        g = grad_kl.to(acc)[:, None, None]
        inv = torch.diag_embed(_tril_inv_diag(torch.diagonal(S, dim1=-2, dim2=-1)))
        d_mu = d_mu + grad_kl.to(acc)[:, None] * mu
        # a row whose kl gets no gradient takes none of the KL's terms (not 0 * NaN)
        d_s = d_s + torch.tril(torch.where(g == 0, 0.0, g * (S - inv)))
    dmu.copy_(d_mu)
    dscale_tril.copy_(d_s)


# -- ahead-of-time compilation (python -m fastvae.kernels.aot --op sample_normal_tril) --


def aot_calls(s: dict, m, r):
    """(kernel, arguments) of every launch the op makes at shape s (K samples of
    B rows of L): the forward and the backward; m makes a tensor of the input
    dtype, r one of its accumulation dtype (kernels/aot.py); the Philox seed is
    a 0-d int64 tensor."""
    K, B, L = s["K"], s["B"], s["L"]
    seed = torch.empty((), dtype=torch.int64, device="meta")
    yield "sample_normal_tril_forward", dict(mu=m(B, L), scale_tril=m(B, L, L), seed=seed, z=m(K, B, L), kl=r(B))
    yield "sample_normal_tril_backward", dict(grad_z=m(K, B, L), grad_kl=r(B), mu=m(B, L), scale_tril=m(B, L, L),
                                              seed=seed, dmu=m(B, L), dscale_tril=m(B, L, L))


# -- the benchmark row (python -m benchmarks.bench_op sample_normal_tril) ---------


def _bench_inputs(size: dict, device):
    B, L, K = size["B"], size["L"], size["K"]
    g = torch.Generator(device="cpu").manual_seed(0)
    mu = torch.randn(B, L, generator=g)
    # a well-conditioned factor, as an encoder's softplus diagonal gives
    S = torch.tril(torch.randn(B, L, L, generator=g) * 0.3, -1) + torch.diag_embed(
        torch.exp(torch.randn(B, L, generator=g) * 0.3))
    mu, S = mu.to(device).requires_grad_(), S.to(device).requires_grad_()
    gz = torch.randn(K, B, L, generator=g).to(device)
    gk = torch.randn(B, generator=g).to(device)
    return (mu, S, K), [mu, S], (gz, gk)


def _bench_eager(mu: Tensor, scale_tril: Tensor, n_samples: int):
    """The formula as users write it: torch.randn, a batched mat-vec
    (S @ eps[..., None]).squeeze(-1), the KL formula; it reads and
    differentiates the whole S."""
    eps = torch.randn((n_samples, *mu.shape), dtype=mu.dtype, device=mu.device)
    z = mu + (scale_tril @ eps[..., None]).squeeze(-1)
    diag = torch.diagonal(scale_tril, dim1=-2, dim2=-1)
    kl = 0.5 * (scale_tril.square().sum((-2, -1)) + mu.square().sum(-1) - mu.shape[-1]
                - 2 * torch.log(diag).sum(-1))
    return z, kl


def _bench_min_bytes(size: dict, itemsize: int = 4) -> dict[str, int]:
    """Fewest bytes each mode must move: every input read once (S's lower
    triangle only), every output written once, no noise tensor stored."""
    B, L, K = size["B"], size["L"], size["K"]
    tri = B * L * (L + 1) // 2
    fwd = (B * L + tri + K * B * L + B) * itemsize  # mu, tril(S) -> z, kl
    bwd = (K * B * L + B + B * L + tri + B * L + B * L * L) * itemsize  # dz, dkl, mu, tril(S) -> dmu, dS
    return {"forward": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}


# B = 4096 rows of L = 8, 32 and 64, K = 1 and 16 samples each (the cases' labels
# give K and L; the title the batch size)
BENCH = Bench("sample_normal_tril, B={B}, float32",
              sizes=tuple({"B": 4096, "L": L, "K": K} for L in (8, 32, 64) for K in (1, 16)),
              quick=tuple({"B": 256, "L": L, "K": K} for L in (8, 32) for K in (1, 4)), inputs=_bench_inputs,
              eager=_bench_eager, min_bytes=_bench_min_bytes, fastvae="sample_normal_tril", label_keys=("K", "L"),
              repeats=lambda size: 15 if size["K"] < 8 else 10)
