"""`python -m fastvae`: a small real run of the ops on this machine.

1. Draws K reparameterized samples for a batch of encoder outputs and checks
   them against what they must be (sample moments, and the analytic KL against
   a Monte Carlo estimate from the same samples).
2. Estimates log p(x) of a linear-Gaussian model (probabilistic PCA), whose
   exact value is known in closed form, with the importance-weighted bound built
   from the ops (sample_normal, gaussian_log_prob, latent_log_ratio,
   logmeanexp): with a mean-field q the bound sits below log p(x) and rises
   toward it as K grows.
3. Times sampling forward+backward against the same computation written in
   plain PyTorch, and says which backend ran.
"""
import argparse
import math
import time

import torch

import fastvae


def _eager(mu, logvar, k):
    z = mu + torch.exp(0.5 * logvar) * torch.randn((k, *mu.shape), dtype=mu.dtype, device=mu.device)
    kl = 0.5 * torch.sum(torch.exp(logvar) + mu * mu - 1 - logvar, dim=-1)
    return z, kl


def _time(fn, repeats=5):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def iwae_on_linear_gaussian(device, B=256, D=20, L=4, sigma=0.5, ks=(1, 10, 100, 1000)):
    """Prints and returns (exact mean log p(x), {K: mean importance-weighted bound})."""
    g = torch.Generator().manual_seed(1)
    W = (torch.randn(D, L, generator=g) / math.sqrt(L)).to(device)
    b = torch.randn(D, generator=g).to(device)
    cov = W @ W.T + sigma**2 * torch.eye(D, device=device)
    px = torch.distributions.MultivariateNormal(b, covariance_matrix=cov)
    x = px.sample((B,))
    exact = px.log_prob(x).mean().item()
    # Exact posterior N(m, S), S = (I + W^T W / sigma^2)^-1; q keeps only diag(S).
    S = torch.linalg.inv(torch.eye(L, device=device) + W.T @ W / sigma**2)
    mu = (x - b) @ W @ S.T / sigma**2
    logvar = torch.log(torch.diagonal(S)).expand(B, L)
    print(f"linear-Gaussian model (D={D}, L={L}, {B} points): exact log p(x) = {exact:.4f}")
    bounds = {}
    for k in ks:
        z, _ = fastvae.sample_normal(mu, logvar, k)
        lw = fastvae.gaussian_log_prob(x, z @ W.T + b, scale=sigma) + fastvae.latent_log_ratio(z, mu, logvar)
        bound = fastvae.logmeanexp(lw, dim=0).mean().item()
        ess = fastvae.effective_sample_size(lw, dim=0).mean().item()
        print(f"  K = {k:4d}: importance-weighted bound {bound:.4f} (gap {exact - bound:.4f}), mean ESS {ess:.1f}")
        bounds[k] = bound
    return exact, bounds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--samples", type=int, default=16)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    B, L, K = args.batch, args.latent, args.samples
    mu = (torch.randn(B, L, device=device) * 0.5).requires_grad_()
    logvar = (torch.randn(B, L, device=device) * 0.5 - 1.0).requires_grad_()
    print(f"fastvae {fastvae.__version__} on {device}: backends {fastvae.backend_info(device)}")

    z, kl = fastvae.sample_normal(mu, logvar, K)
    eps = ((z - mu) / torch.exp(0.5 * logvar)).detach().double()
    n = eps.numel()
    print(f"{K} x {B} x {L} samples: standardized mean {eps.mean().item():+.5f}, "
          f"variance {eps.var().item():.5f} (expected 0 and 1 within {5 / math.sqrt(n):.5f})")
    # Monte Carlo KL from the same samples: E_q[log q(z) - log p(z)] = E[-eps^2/2 - logvar/2 + z^2/2]
    mc = (0.5 * (z.detach() ** 2 - eps ** 2) - 0.5 * logvar.detach()).sum(-1).mean(0)
    print(f"KL per example: analytic {kl.mean().item():.4f}, Monte Carlo {mc.mean().item():.4f}")

    iwae_on_linear_gaussian(device)

    def step(fn):
        zz, kk = fn(mu, logvar, K)
        (zz.square().mean() + kk.mean()).backward()

    step(fastvae.sample_normal), step(_eager)  # warm-up
    t_fast = _time(lambda: step(fastvae.sample_normal))
    t_eager = _time(lambda: step(_eager))
    print(f"forward+backward: fastvae {t_fast * 1e3:.1f} ms, plain PyTorch {t_eager * 1e3:.1f} ms "
          f"({t_eager / t_fast:.1f}x)")


if __name__ == "__main__":
    main()
