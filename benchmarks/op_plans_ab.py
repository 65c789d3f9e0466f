"""The ops' own plans under torch.compile, A/B in one process, on the CPU
stand-in for the CUDA path (bench_host_cost's: every Triton launch stubbed,
so the figures are host time alone).

A compiled graph calls fastvae::sample_concrete, fastvae::bernoulli_log_prob,
fastvae::sample_normal and the latent families' fused draw and KL
(fastvae::sample_location_scale_kl, fastvae::sample_positive_kl),
fastvae::stick_breaking, a hierarchical VAE's group (fastvae::sample_normal_kl),
the likelihoods (fastvae::gaussian_log_prob, laplace_log_prob,
continuous_bernoulli_log_prob, categorical_log_prob, the count likelihoods,
discretized_logistic_mixture_log_prob), fastvae::sample_normal_tril,
fastvae::mixture_log_prob, the family samplers' draws with log q,
fastvae::logmeanexp,
and their backwards, itself; with the plans on, those calls launch from
per-signature plans (docs/architecture.md, "The ops' own plans"). This
switches every op's plans off and on (their ENABLED,
fastvae._registry.plan_switches) between interleaved rounds of the same
compiled steps and prints each step's host time less its compiled baseline:

    TRITON_INTERPRET=1 python -m benchmarks.op_plans_ab [--rounds 9] [--calls 200]

The steps: the Concrete sampler at a Gumbel-softmax VAE's size (100, 30, 10),
forward + backward, bench_host_cost's Gumbel-softmax ELBO and Laplace
ELBO with a Laplace prior, a Weibull ELBO with a Weibull prior and a
logistic-normal ELBO with a logistic-normal prior at the same sizes, and
bench_host_cost's one hierarchical group (sample_normal_kl against VDVAE's
two functions); bench_host_cost's Gaussian-decoder ELBOs: (mean, logvar)
from one decoder output, and the mean alone (unit variance); an IWAE (k = 5)
with the (mean, logvar) decoder, whose tail the plans do not fuse (the
Gaussian likelihood's and logmeanexp's nodes); an ELBO with a Laplace
likelihood, (loc, log-scale) from one decoder output; ELBOs with a
continuous Bernoulli likelihood, a learned Gaussian-mixture prior (10
components), a full-covariance posterior, a categorical likelihood (16
classes), a negative binomial likelihood with a per-gene dispersion and
PixelCNN++'s likelihood (4 x 4 images, 2 components); a Laplace IWAE (k = 5).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import fastvae
from fastvae import _registry
from fastvae.distributions import TrilNormal

from . import bench_host_cost


def _use_plans(on: bool) -> None:
    # (compiled calls never take the eager plans these flags also switch)
    for module in _registry.plan_switches():
        module.ENABLED = on


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the triton backend on CPU tensors)")
    torch.set_num_threads(1)
    fastvae.set_value_checks("never")
    bench_host_cost._stub_launches()
    logits = torch.randn(100, 30, 10, requires_grad=True)
    w = torch.randn(100, 30, 10)

    def sampler():
        z, _ = fastvae.sample_concrete(logits, 1.0)
        return (z * w).sum()

    def sampler_base():
        return (logits * w).sum()

    cases = bench_host_cost._setup(torch.device("cpu"))
    elbo, _, elbo_base, leaves = cases["elbo concrete (gumbel-softmax)"]
    laplace, _, laplace_base, laplace_leaves = cases["elbo laplace, laplace prior"]
    group, _, group_base, group_leaves = cases["sample_normal_kl, one group"]
    gaussian, _, gaussian_base, gaussian_leaves = cases["elbo gaussian"]
    unit, _, unit_base, unit_leaves = cases["elbo gaussian, mean alone"]
    B, L, D = bench_host_cost.B, bench_host_cost.L, bench_host_cost.D
    x = (torch.rand(B, D) > 0.5).float()
    W = torch.randn(L, D) * 0.3
    a, b = (0.3 * torch.randn(B, L).requires_grad_() for _ in range(2))
    ones = torch.ones(L)

    def weibull():  # a positive family: the sampler's and family_kl's kernels, two each way
        q = torch.distributions.Weibull(a.exp(), b.exp())
        return -fastvae.elbo(x, q, lambda z: z @ W, likelihood="bernoulli",
                             prior=torch.distributions.Weibull(ones, ones))

    def weibull_base():
        return (a.exp() + b.exp()).sum()

    W1 = torch.randn(L + 1, D) * 0.3
    zeros = torch.zeros(L)

    def logistic_normal():  # the Gaussian sampler's and the stick-breaking's nodes
        q = torch.distributions.LogisticNormal(a, b.exp())
        return -fastvae.elbo(x, q, lambda z: z @ W1, likelihood="bernoulli",
                             prior=torch.distributions.LogisticNormal(zeros, ones))

    W2 = torch.randn(L, 2 * D) * 0.3

    def gaussian_iwae():  # the Gaussian likelihood's and logmeanexp's nodes: a tail the plans do not fuse
        def decode(z):
            h = z @ W2
            return h[..., :D], h[..., D:]
        return -fastvae.iwae(x, a, b, decode, k=5, likelihood="gaussian")

    def decoder_base():
        return (a @ W2).sum() + b.sum()

    def laplace_decoder():  # a Laplace likelihood's nodes: (loc, log-scale) from one decoder output
        def decode(z):
            h = z @ W2
            return h[..., :D], h[..., D:]
        return -fastvae.elbo(x, a, b, decode, likelihood="laplace")

    def continuous_bernoulli():  # the continuous Bernoulli likelihood's nodes (no fused tail)
        return -fastvae.elbo(x, a, b, lambda z: z @ W, likelihood="continuous_bernoulli")

    def continuous_bernoulli_base():
        return (a @ W).sum() + b.sum()

    means, logvars = (0.5 * torch.randn(10, L)).requires_grad_(), (0.1 * torch.randn(10, L)).requires_grad_()
    mog = fastvae.priors.MixtureOfGaussians(means, logvars)

    def mixture_prior():  # a learned Gaussian-mixture prior's density nodes
        return -fastvae.elbo(x, a, b, lambda z: z @ W, likelihood="bernoulli", prior=mog)

    def laplace_iwae():  # the location-scale sampler's draw with log q
        q = torch.distributions.Laplace(a, b.exp())
        return -fastvae.iwae(x, q, lambda z: z @ W, k=5, likelihood="bernoulli",
                             prior=torch.distributions.Laplace(zeros, ones))

    tril = (torch.eye(L) + 0.1 * torch.randn(B, L, L).tril(-1)).requires_grad_()

    def full_covariance():  # the full-covariance sampler's nodes
        return -fastvae.elbo(x, TrilNormal(a, tril), lambda z: z @ W, likelihood="bernoulli")

    C = 16
    x_classes = torch.randint(0, C, (B, D))
    Wc = torch.randn(L, D * C) * 0.3

    def categorical():  # a categorical likelihood's nodes (C = 16 classes a dimension)
        return -fastvae.elbo(x_classes, a, b, lambda z: (z @ Wc).unflatten(-1, (D, C)), likelihood="categorical")

    counts = torch.poisson(torch.full((B, D), 3.0))
    log_theta = torch.zeros(D, requires_grad=True)

    def negative_binomial():  # a count likelihood's nodes, scVI's per-gene dispersion
        return -fastvae.elbo(counts, a, b, lambda z: {"log_mean": z @ W, "log_theta": log_theta},
                             likelihood="negative_binomial")

    images = (torch.randint(0, 256, (B, 3, 4, 4)).float() / 127.5 - 1.0)
    Wi = torch.randn(L, 10 * 2 * 16) * 0.1

    def logistic_mixture():  # PixelCNN++'s likelihood's nodes (2 components, 4 x 4 images)
        return -fastvae.elbo(images, a, b, lambda z: (z @ Wi).unflatten(-1, (20, 4, 4)),
                             likelihood="discretized_logistic_mixture")

    steps = {"sampler": (sampler, (logits,)), "sampler base": (sampler_base, (logits,)),
             "elbo": (elbo, leaves), "elbo base": (elbo_base, leaves),
             "laplace elbo": (laplace, laplace_leaves), "laplace elbo base": (laplace_base, laplace_leaves),
             "weibull elbo": (weibull, (a, b)), "weibull elbo base": (weibull_base, (a, b)),
             "logistic-normal elbo": (logistic_normal, (a, b)), "logistic-normal elbo base": (weibull_base, (a, b)),
             "hierarchical group": (group, group_leaves), "hierarchical group base": (group_base, group_leaves),
             "gaussian elbo": (gaussian, gaussian_leaves), "gaussian elbo base": (gaussian_base, gaussian_leaves),
             "gaussian elbo, mean alone": (unit, unit_leaves),
             "gaussian elbo, mean alone base": (unit_base, unit_leaves),
             "gaussian iwae k=5": (gaussian_iwae, (a, b)), "gaussian iwae k=5 base": (decoder_base, (a, b)),
             "laplace-decoder elbo": (laplace_decoder, (a, b)),
             "laplace-decoder elbo base": (decoder_base, (a, b)),
             "continuous-bernoulli elbo": (continuous_bernoulli, (a, b)),
             "continuous-bernoulli elbo base": (continuous_bernoulli_base, (a, b)),
             "mixture-prior elbo": (mixture_prior, (a, b, means, logvars)),
             "mixture-prior elbo base": (continuous_bernoulli_base, (a, b)),
             "laplace iwae k=5": (laplace_iwae, (a, b)), "laplace iwae k=5 base": (weibull_base, (a, b)),
             "full-covariance elbo": (full_covariance, (a, tril)),
             "full-covariance elbo base": (continuous_bernoulli_base, (a, b)),
             "categorical-decoder elbo": (categorical, (a, b)),
             "categorical-decoder elbo base": (continuous_bernoulli_base, (a, b)),
             "negative-binomial elbo": (negative_binomial, (a, b)),
             "negative-binomial elbo base": (continuous_bernoulli_base, (a, b)),
             "logistic-mixture elbo": (logistic_mixture, (a, b)),
             "logistic-mixture elbo base": (continuous_bernoulli_base, (a, b))}
    steps = {k: (torch.compile(f, fullgraph=True), leaves) for k, (f, leaves) in steps.items()}
    times = {(k, on): [] for k in steps for on in (False, True)}
    with fastvae.use_backend("triton"):
        for f, leaves in steps.values():
            for on in (False, True):
                _use_plans(on)
                for _ in range(30):
                    torch.autograd.grad(f(), leaves)
        for _ in range(args.rounds):
            for k, (f, leaves) in steps.items():
                for on in (False, True):
                    _use_plans(on)
                    t = time.perf_counter()
                    for _ in range(args.calls):
                        torch.autograd.grad(f(), leaves)
                    times[(k, on)].append((time.perf_counter() - t) / args.calls * 1e6)
    _use_plans(True)
    med = {key: statistics.median(v) for key, v in times.items()}
    result = {}
    for name in ("sampler", "elbo", "laplace elbo", "weibull elbo", "logistic-normal elbo", "hierarchical group",
                 "gaussian elbo", "gaussian elbo, mean alone", "gaussian iwae k=5", "laplace-decoder elbo",
                 "continuous-bernoulli elbo", "mixture-prior elbo", "laplace iwae k=5", "full-covariance elbo",
                 "categorical-decoder elbo", "negative-binomial elbo", "logistic-mixture elbo"):
        own = {on: round(med[(name, on)] - med[(f"{name} base", on)], 1) for on in (False, True)}
        result[name] = {"general_us": own[False], "op_plans_us": own[True]}
        print(f"compiled {name}: {own[False]} us a step with the general launch, {own[True]} us with the ops' "
              f"plans (less the compiled baseline)")
    return result


if __name__ == "__main__":
    main()
