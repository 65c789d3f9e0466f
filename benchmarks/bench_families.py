"""Each latent family in the whole objective: fastvae.elbo and fastvae.iwae
(k = 5) with the family's torch posterior and prior, against the same
objective written by hand with torch.distributions, eager and compiled.

  python -m benchmarks.bench_families [--quick] [--eager] [--families laplace concrete ...] [--out FILE]

What is measured: one training call, forward + backward (torch.autograd.grad
of the loss to the encoder's outputs), as a user writes it: the posterior
object is built from the encoder's outputs inside the call (its argument
checks included, as torch does by default), the prior is built once. The
decoder is cheap on purpose (elementwise logits z * a + c, Bernoulli
likelihood), so the figures are the latent side's: the draw, log q, log p and
the KL. Sizes: B = 65536, L = 32 latents (the relaxed categorical and the
logistic-normal: B = 4096, L = 32, C = 16 categories); --quick: tiny sizes,
a smoke run, not figures.

The hand-written objective: ``q.rsample()``, binary_cross_entropy_with_logits,
``kl_divergence(q, p)`` summed over the latents where torch has the closed form
(Monte Carlo ``q.log_prob(z) - p.log_prob(z)`` where it has none: Weibull,
Kumaraswamy against Beta), and for IWAE ``logsumexp`` of the k log-weights.
The relaxed categorical's ELBO takes the categorical KL of its logits against
a uniform ``OneHotCategorical`` (as Gumbel-softmax VAEs do), its IWAE a
relaxed uniform prior. fastvae's objective gets the same torch objects.

Implementations, rounds interleaved so that drift hits all alike: ``hand``,
``fastvae``, and each under ``torch.compile`` (default options, graph breaks
allowed: torch.distributions' argument checks break fullgraph tracing on
some families). Figures are medians of ms per call; ratios above 1 mean
fastvae is faster. Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.distributions as td
import torch.nn.functional as F

import fastvae
from fastvae import _plan, latents, objectives, priors

from . import common

K = 5


def _pos(t):
    return F.softplus(t) + 1e-3


# family -> (posterior from the encoder's outputs, prior, event dims of z beyond the latent, leaves' count)
def _families(L: int, C: int, device, dtype):
    z0, z1 = torch.zeros(L, device=device, dtype=dtype), torch.ones(L, device=device, dtype=dtype)
    uniform_logits = torch.zeros(L, C, device=device, dtype=dtype)
    temp = torch.tensor(0.5, device=device, dtype=dtype)
    return {
        "normal": (lambda a, b: td.Normal(a, _pos(b)), td.Normal(z0, z1), 0),
        "laplace": (lambda a, b: td.Laplace(a, _pos(b)), td.Laplace(z0, z1), 0),
        "uniform": (lambda a, b: td.Uniform(a.tanh(), a.tanh() + _pos(b)), td.Uniform(z0 - 4, z1 + 4), 0),
        "gumbel": (lambda a, b: td.Gumbel(a, _pos(b)), td.Gumbel(z0, z1), 0),
        "cauchy": (lambda a, b: td.Cauchy(a, _pos(b)), td.Cauchy(z0, z1), 0),
        "exponential": (lambda a, b: td.Exponential(_pos(a + b)), td.Exponential(z1), 0),
        "weibull": (lambda a, b: td.Weibull(_pos(a), _pos(b) + 0.5), td.Weibull(z1, z1), 0),
        "lognormal": (lambda a, b: td.LogNormal(a, _pos(b)), td.LogNormal(z0, z1), 0),
        "kumaraswamy": (lambda a, b: td.Kumaraswamy(_pos(a), _pos(b)), td.Beta(z1, z1), 0),
        "logistic_normal": (lambda a, b: td.LogisticNormal(a, _pos(b)), td.LogisticNormal(z0, z1), 0),
        # the relaxed densities unvalidated: torch's own float32 rsample at (K, 4096, 32, 16) can fall
        # outside its simplex check's tolerance, which then refuses the hand-written iwae's log_prob
        # (the check left out makes the hand-written loss faster, not fastvae)
        "concrete": (lambda a, b: td.RelaxedOneHotCategorical(temp, logits=a + b, validate_args=False),
                     (td.OneHotCategorical(logits=uniform_logits),
                      td.RelaxedOneHotCategorical(temp, logits=uniform_logits, validate_args=False)), 1),
    }


SMALL = ("concrete", "logistic_normal")


def _per_example(d, z, extra: int):
    """log density of z summed over the latents: (..., B) from z (..., B, L[, C])."""
    lp = d.log_prob(z)
    while lp.dim() > z.dim() - 1 - extra:
        lp = lp.sum(-1)
    return lp


def _kl(q, p, z):
    """The hand-written KL per example: closed form where torch has it, else Monte Carlo on z."""
    try:
        kl = td.kl_divergence(q, p)
    except NotImplementedError:
        return _per_example(q, z, 0) - _per_example(p, z, 0)
    return kl.sum(-1) if kl.dim() == z.dim() else kl


def _cases(B: int, L: int, C: int, device, dtype, names):
    cases = {}
    for name, (make_q, prior, extra) in _families(L, C, device, dtype).items():
        if name not in names:
            continue
        b = B if name not in SMALL else max(1, B // 16)
        g = torch.Generator().manual_seed(0)
        shape = (b, L, C) if extra else (b, L)
        a = (0.5 * torch.randn(shape, generator=g, dtype=dtype)).to(device).requires_grad_()
        s = (0.5 * torch.randn(shape, generator=g, dtype=dtype)).to(device).requires_grad_()
        D = L * C if extra else L + (name == "logistic_normal")
        x = (torch.rand(b, D, generator=g) < 0.5).to(device, dtype)
        w = torch.randn(D, generator=g, dtype=dtype).to(device)
        c = torch.randn(D, generator=g, dtype=dtype).to(device)

        def decode(z, extra=extra, w=w, c=c):
            return (z.flatten(-2) if extra else z) * w + c

        elbo_prior, iwae_prior = prior if isinstance(prior, tuple) else (prior, prior)

        def hand_elbo(make_q=make_q, p=elbo_prior, decode=decode, x=x, a=a, s=s, concrete=bool(extra)):
            q = make_q(a, s)
            z = q.rsample()
            rec = -F.binary_cross_entropy_with_logits(decode(z), x, reduction="none").sum(-1)
            if concrete:  # the categorical KL of the logits (a Gumbel-softmax VAE's)
                kl = td.kl_divergence(td.OneHotCategorical(logits=q.logits), p).sum(-1)
            else:
                kl = _kl(q, p, z)
            return -(rec - kl).mean()

        def hand_iwae(make_q=make_q, p=iwae_prior, decode=decode, x=x, a=a, s=s, extra=extra):
            q = make_q(a, s)
            z = q.rsample((K,))
            rec = -F.binary_cross_entropy_with_logits(decode(z), x.expand(K, *x.shape), reduction="none").sum(-1)
            lw = rec + _per_example(p, z, extra) - _per_example(q, z, extra)
            return -(torch.logsumexp(lw, 0) - math.log(K)).mean()

        def fv_elbo(make_q=make_q, p=elbo_prior, decode=decode, x=x, a=a, s=s):
            return -fastvae.elbo(x, make_q(a, s), decode, prior=p, likelihood="bernoulli")

        def fv_iwae(make_q=make_q, p=iwae_prior, decode=decode, x=x, a=a, s=s):
            return -fastvae.iwae(x, make_q(a, s), decode, k=K, prior=p, likelihood="bernoulli")

        cases[f"{name} elbo"] = (hand_elbo, fv_elbo, (a, s), shape)
        cases[f"{name} iwae k={K}"] = (hand_iwae, fv_iwae, (a, s), shape)
    return cases


# the families whose torch posterior's scale the eager C++ samplers take as it is
SCALE_FORM = ("normal", "lognormal", "logistic_normal", "laplace", "uniform", "gumbel", "cauchy")


def _logvar_formed(fv):
    """fv with the torch posterior's logvar (log-scale) formed in torch
    (objectives.SCALE_FORM and _plan.SCALE_IN_KERNELS off)."""
    def call():
        objectives.SCALE_FORM = _plan.SCALE_IN_KERNELS = False
        try:
            return fv()
        finally:
            objectives.SCALE_FORM = _plan.SCALE_IN_KERNELS = True
    return call


# the families whose IWAE takes log q - log p of its own family's prior from the sampler's C++ kernels,
# and those whose torch prior's log-density fastvae takes in its own form (priors._positive_log_prob)
RATIO_FORM = ("laplace", "uniform", "gumbel", "cauchy")
POSITIVE_FORM = ("exponential", "weibull", "kumaraswamy")


def _prior_log_prob(fv, family):
    """fv with the IWAE's log p(z) from the prior's log_prob: for RATIO_FORM,
    latents.RATIO_IN_KERNELS off; for POSITIVE_FORM, priors.POSITIVE_FORM
    off (the torch object's own log_prob)."""
    module, switch = (latents, "RATIO_IN_KERNELS") if family in RATIO_FORM else (priors, "POSITIVE_FORM")

    def call():
        setattr(module, switch, False)
        try:
            return fv()
        finally:
            setattr(module, switch, True)
    return call


# the extra arms: implementation name -> its ratio's key in a record and the table's column
AB_ARMS = {"fastvae logvar": ("logvar formed vs hand", "fastvae, logvar formed in torch (ms)"),
           "fastvae log_prob": ("prior log_prob vs hand", "fastvae, the prior's log_prob (ms)")}


def measure(quick: bool, names, device, compiled: bool = True, rounds: int | None = None,
            n: int | None = None, scale_ab: bool = False, ratio_ab: bool = False) -> list[dict]:
    B, L, C = (256, 8, 4) if quick else (65536, 32, 16)
    rounds, n = rounds or (2 if quick else 5), n or (2 if quick else 3)
    dtype = torch.float32
    records = []
    for case, (hand, fv, leaves, shape) in _cases(B, L, C, device, dtype, names).items():
        impls = {"hand": hand, "fastvae": fv}
        family = case.split()[0]
        if scale_ab and case.endswith("elbo") and family in SCALE_FORM:
            impls["fastvae logvar"] = _logvar_formed(fv)
        if ratio_ab and "iwae" in case and family in RATIO_FORM + POSITIVE_FORM:
            impls["fastvae log_prob"] = _prior_log_prob(fv, family)
        if compiled:
            impls.update({"hand compiled": torch.compile(hand), "fastvae compiled": torch.compile(fv)})
        torch._dynamo.reset()
        steps = {k: (lambda f=f, leaves=leaves: torch.autograd.grad(f(), leaves)) for k, f in impls.items()}
        for s in steps.values():
            for _ in range(2):  # compile, warm up
                s()
        times = {k: [] for k in steps}
        for _ in range(rounds):
            for k, s in steps.items():
                common.sync(device)
                t = time.perf_counter()
                for _ in range(n):
                    s()
                common.sync(device)
                times[k].append((time.perf_counter() - t) / n * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        record = {"case": case, "shape": list(shape), **{f"{k} ms": round(v, 3) for k, v in med.items()},
                  "vs hand": round(med["hand"] / med["fastvae"], 2)}
        for arm, (key, _) in AB_ARMS.items():
            if arm in med:
                record[key] = round(med["hand"] / med[arm], 2)
        if compiled:
            record.update({"vs hand compiled": round(med["hand compiled"] / med["fastvae"], 2),
                           "compiled vs hand compiled": round(med["hand compiled"] / med["fastvae compiled"], 2)})
        records.append(record)
        common.log(str(record))
    return records


def table(records: list[dict]) -> str:
    arms = [arm for arm in AB_ARMS if any(f"{arm} ms" in r for r in records)]
    lines = ["| case (forward + backward) | shape | hand (ms) | fastvae (ms) | hand compiled (ms) | "
             "fastvae compiled (ms) | fastvae vs hand | fastvae vs hand compiled | compiled vs compiled |"
             + "".join(f" {AB_ARMS[arm][1]} | {AB_ARMS[arm][0]} |" for arm in arms),
             "|" + "---|" * (9 + 2 * len(arms))]
    for r in records:
        cells = [r["case"], tuple(r["shape"]), r["hand ms"], r["fastvae ms"], r.get("hand compiled ms", "-"),
                 r.get("fastvae compiled ms", "-"), r["vs hand"], r.get("vs hand compiled", "-"),
                 r.get("compiled vs hand compiled", "-")]
        for arm in arms:
            cells += [r.get(f"{arm} ms", "-"), r.get(AB_ARMS[arm][0], "-")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not figures")
    families = list(_families(1, 1, "cpu", torch.float32))
    p.add_argument("--families", nargs="+", default=None, choices=families, metavar="FAMILY",
                   help=f"a subset of the families (default: all): {', '.join(families)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--memory", action="store_true", help="accepted for the suite; no memory figures here")
    p.add_argument("--eager", action="store_true", help="leave the torch.compile rows out")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; 2 with --quick)")
    p.add_argument("--calls", type=int, default=None, help="calls per round (default 3; 2 with --quick)")
    p.add_argument("--scale-ab", action="store_true",
                   help="also time the ELBOs of the normal, log-normal, logistic-normal, Laplace, uniform, Gumbel "
                        "and Cauchy posteriors with their logvar (log-scale) formed in torch "
                        "(fastvae.objectives.SCALE_FORM and fastvae._plan.SCALE_IN_KERNELS off), interleaved with "
                        "the rest")
    p.add_argument("--ratio-ab", action="store_true",
                   help="also time the IWAEs of the Laplace, uniform, Gumbel and Cauchy posteriors with log p(z) "
                        "from the prior's log_prob (fastvae.latents.RATIO_IN_KERNELS off), and of the exponential, "
                        "Weibull and Kumaraswamy posteriors with the torch prior's own log_prob "
                        "(fastvae.priors.POSITIVE_FORM off), interleaved with the rest")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    names = args.families or families
    records = measure(args.quick, names, device, compiled=not args.eager, rounds=args.rounds, n=args.calls,
                      scale_ab=args.scale_ab, ratio_ab=args.ratio_ab)
    payload = {"op": "families", **common.metadata(device),
               "title": "Each latent family's whole objective, forward + backward, fastvae against torch.distributions",
               "records": records, "table_markdown": table(records)}
    path = common.write_json(common.result_path("families", device, args.quick, args.out), payload)
    common.log(f"wrote {path}")
    print(payload["table_markdown"])
    return payload


if __name__ == "__main__":
    main()
