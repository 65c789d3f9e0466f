"""A small top-down hierarchical VAE on digits (VDVAE-style), trained once
with fastvae's fused calls and once with VDVAE's own formulas, from the same
initialization, and evaluated by importance sampling.

The model (Child 2021, "Very Deep VAEs", scaled down): a bottom-up pass of
bottleneck residual blocks (1x1 down to a quarter of the width, two 3x3, 1x1
up, GELU before each) at 8x8, 4x4 and 2x2, then a top-down pass from a
learned 2x2 state where each latent group l (spatial, zdim channels at
2x2, 4x4 and 8x8: three groups) has

- its prior p(z_l | z_<l) from the top-down state alone (VDVAE's ``prior``
  block, whose last conv starts at zero, so p starts as N(0, I)),
- its posterior q(z_l | x, z_<l) from the top-down state and the bottom-up
  activations at its resolution (VDVAE's ``enc`` block),

both diagonal Gaussians given by means and log standard deviations, and z_l
projected back into the top-down state. The decoder ends in a mixture of
discretized logistics per pixel (PixelCNN++'s likelihood, VDVAE's DmolNet).

The data: scikit-learn's 8x8 digits (fastvae.demo.load_digits: pixels / 16
in [0, 1], 297 held out). A digit's pixels take the 17 values 0..16, so they
are treated as 17-level discrete data: x = 2 p / 16 - 1 lies on the grid of
``fastvae.discretized_logistic_mixture_log_prob(..., num_bins=17)`` (bins of
width 2 / 16 in [-1, 1]), and log p(x) is a normalized pmf over the 17^64
images, in nats per image; bits/dim divides by 64 ln 2 (a uniform model of
17 levels scores log2 17 = 4.09 bits/dim). Not comparable with 8-bit image
figures (256 levels) or with binarized digits.

The two objectives, the same negative ELBO per dimension:

- fused: each group's draw and KL by ``fastvae.sample_normal_kl(qm, qv, pm,
  pv, param="logstd")`` (one kernel forward, one backward), the bound by
  ``fastvae.hierarchical_elbo`` (with ``log_px=`` from the 17-level
  likelihood, which it does not take by name);
- VDVAE's: ``draw_gaussian_diag_samples`` and ``gaussian_analytical_kl``
  as in VDVAE's vae_helpers.py, in plain torch, summed as VDVAE's vae.py sums
  them (distortion + rate per dimension), with the same likelihood.

Both weigh the KL terms by NVAE's warm-up coefficient (``fastvae.kl_warmup``,
0 rising to 1 over ``--warmup`` steps; ``kl_weight=`` of hierarchical_elbo,
a factor on VDVAE's rate): with the full KL from the first step this small
model switches its latent groups off within a few hundred steps (the KL per
group the example prints is the collapse diagnostic; at the default seed the
2x2 group is off even so).

On the same noise (the reference drawing fastvae's Philox normals through
``fastvae.sample_normal``) the two give the same loss and gradients to
rounding: checked at initialization and on the trained model. Trained, each
draws its own noise (VDVAE's torch normals, fastvae's Philox stream), so the
two models differ by training noise.

Evaluation, per held-out digit: the ELBO (analytic KLs, one draw), and log
p(x) by importance sampling with the posterior as proposal, z drawn top-down
from q,

    log w = log p(x | z) + Σ_l [log p(z_l | z_<l) − log q(z_l | x, z_<l)],

by ``fastvae.importance_log_likelihood`` (K streamed in chunks that fastvae
sizes from a memory budget: the model never sees more than one chunk of
samples, whatever K, and the stream keeps two numbers per digit), with its
delta-method standard error, ESS and Pareto k̂. Two hand-written checks:

- the same samples: the log-weights the stream saw, recorded as it ran and
  reduced by hand (torch.logsumexp over all K at once): the same log p̂(x)
  to rounding;
- a hand-written importance-sampling loop with its own draws (the (K, N)
  log-weights held in memory, as such loops do), on the model trained with
  the fused calls: the same log p(x) within its Monte Carlo error.

The figures of the default run are in docs/hierarchical.md ("A real
hierarchy"), with the command and the machine.

Run: python examples/hierarchical_vae.py [--steps 400] [--warmup 300] [--k 1000] [--width 16] [--zdim 2]
     [--mixtures 3] [--n-test 100] [--seed 0]   (about two minutes of one CPU core)
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import fastvae
from fastvae.demo import load_digits

LEVELS = 17  # a digit's pixel takes the values 0..16
RESOLUTIONS = (2, 4, 8)  # the latent groups, top first


def to_images(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 64) pixels / 16 in [0, 1] -> (N, 1, 8, 8) on the 17-level grid in
    [-1, 1] (exact in float32: k / 16 * 2 - 1 = k / 8 - 1)."""
    return (2 * pixels - 1).reshape(-1, 1, 8, 8)


# -- the model (VDVAE's blocks, scaled down) -------------------------------------------


def conv(cin: int, cout: int, k: int, scale: float = 1.0) -> nn.Conv2d:
    c = nn.Conv2d(cin, cout, k, padding=k // 2)
    with torch.no_grad():
        c.weight.mul_(scale)
        if scale == 0:
            c.bias.zero_()
    return c


class Block(nn.Module):
    """VDVAE's bottleneck block: GELU then 1x1 to the middle width, two 3x3,
    1x1 out; residual when the widths agree."""

    def __init__(self, cin: int, mid: int, cout: int, residual: bool, last_scale: float = 1.0):
        super().__init__()
        self.residual = residual
        self.c1, self.c2, self.c3 = conv(cin, mid, 1), conv(mid, mid, 3), conv(mid, mid, 3)
        self.c4 = conv(mid, cout, 1, last_scale)

    def forward(self, x):
        h = self.c4(F.gelu(self.c3(F.gelu(self.c2(F.gelu(self.c1(F.gelu(x))))))))
        return x + h if self.residual else h


class DecBlock(nn.Module):
    """One latent group at one resolution (VDVAE's DecBlock): the prior from
    the top-down state h, the posterior from h and the bottom-up activations,
    z_l drawn by ``group`` and projected back into h."""

    def __init__(self, res: int, width: int, zdim: int, n_groups: int):
        super().__init__()
        self.res, self.zdim = res, zdim
        mid = max(1, width // 4)
        self.enc = Block(2 * width, mid, 2 * zdim, residual=False)
        self.prior = Block(width, mid, 2 * zdim + width, residual=False, last_scale=0.0)  # p = N(0, I) at first
        self.z_proj = conv(zdim, width, 1, math.sqrt(1 / n_groups))
        self.resnet = Block(width, mid, width, residual=True, last_scale=math.sqrt(1 / n_groups))

    def forward(self, h, acts, group):
        qm, qv = self.enc(torch.cat([h, acts], 1)).chunk(2, 1)
        feats = self.prior(h)
        z_ = self.zdim
        pm, pv, hpp = feats[:, :z_], feats[:, z_:2 * z_], feats[:, 2 * z_:]
        z, term = group(qm, qv, pm, pv)
        return self.resnet(h + hpp + self.z_proj(z)), term


class TopDownVAE(nn.Module):
    """Bottom-up 8x8 -> 4x4 -> 2x2, top-down 2x2 -> 4x4 -> 8x8 with a latent
    group at each resolution, and a discretized logistic mixture of
    ``mixtures`` components per pixel.

    forward(x, group) -> (likelihood parameters, [one term per group]):
    group(qm, qv, pm, pv) -> (z, term) draws each group's z from q given
    means and log standard deviations, and its term is whatever the caller
    needs (the KL per element for training, log p(z) − log q(z) per example
    for importance sampling)."""

    def __init__(self, width: int = 32, zdim: int = 4, mixtures: int = 3):
        super().__init__()
        self.mixtures = mixtures
        mid = max(1, width // 4)
        self.stem = conv(1, width, 3)
        self.up = nn.ModuleList(Block(width, mid, width, residual=True) for _ in RESOLUTIONS)
        self.down = nn.ModuleList(DecBlock(r, width, zdim, len(RESOLUTIONS)) for r in RESOLUTIONS)
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(1, width, r, r)) for r in RESOLUTIONS)
        self.gain = nn.Parameter(torch.ones(1, width, 1, 1))
        self.out = conv(width, 3 * mixtures, 1)

    def forward(self, x, group):
        h, acts = self.stem(x), {}
        for block, res in zip(self.up, RESOLUTIONS[::-1]):
            if h.shape[-1] > res:
                h = F.avg_pool2d(h, h.shape[-1] // res)
            h = block(h)
            acts[res] = h
        h, terms = None, []
        for block, bias in zip(self.down, self.bias):
            start = bias.expand(x.shape[0], -1, -1, -1)
            h = start if h is None else start + F.interpolate(h, scale_factor=block.res // h.shape[-1])
            h, term = block(h, acts[block.res], group)
            terms.append(term)
        out = self.out(h * self.gain)
        M = self.mixtures
        # (logit_probs (B, M, 8, 8), means (B, M, 1, 8, 8), log_scales (B, M, 1, 8, 8)): one channel
        return (out[:, :M], out[:, M:2 * M].unsqueeze(2), out[:, 2 * M:].unsqueeze(2)), terms


def log_px_z(x, params):
    """log p(x | z) per image (B,): the 17-level discretized logistic mixture."""
    return fastvae.discretized_logistic_mixture_log_prob(x, params, num_bins=LEVELS)


# -- the two objectives ------------------------------------------------------------------


def fused_group(qm, qv, pm, pv, generator=None):
    """z and the KL per element in one fused call (log standard deviations, as VDVAE keeps them)."""
    return fastvae.sample_normal_kl(qm, qv, pm, pv, param="logstd", generator=generator)


def fused_loss(model: TopDownVAE, x, group=fused_group, kl_weight: float = 1.0):
    """VDVAE's minimized figure, −ELBO per dimension (the KLs weighted by
    kl_weight during warm-up), by fastvae.hierarchical_elbo."""
    params, kls = model(x, group)
    terms = fastvae.hierarchical_elbo(x, None, kls, log_px=log_px_z(x, params), kl_weight=kl_weight)
    return -terms.bound / math.prod(x.shape[1:])


def gaussian_analytical_kl(mu1, mu2, logsigma1, logsigma2):
    """VDVAE's (vae_helpers.py): KL(N(mu1, sigma1) || N(mu2, sigma2)) per element."""
    return -0.5 + logsigma2 - logsigma1 + 0.5 * (logsigma1.exp() ** 2 + (mu1 - mu2) ** 2) / (logsigma2.exp() ** 2)


def draw_gaussian_diag_samples(mu, logsigma):
    """VDVAE's (vae_helpers.py)."""
    eps = torch.empty_like(mu).normal_(0., 1.)
    return torch.exp(logsigma) * eps + mu


def vdvae_group(qm, qv, pm, pv):
    return draw_gaussian_diag_samples(qm, qv), gaussian_analytical_kl(qm, pm, qv, pv)


def vdvae_loss(model: TopDownVAE, x, group=vdvae_group, kl_weight: float = 1.0):
    """VDVAE's loss as its vae.py forms it: distortion and rate per dimension
    (the rate times kl_weight during warm-up, as NVAE weighs it)."""
    params, kls = model(x, group)
    ndims = math.prod(x.shape[1:])
    distortion_per_pixel = -log_px_z(x, params) / ndims
    rate_per_pixel = torch.zeros_like(distortion_per_pixel)
    for kl in kls:
        rate_per_pixel += kl.sum(dim=(1, 2, 3))
    rate_per_pixel /= ndims
    return (distortion_per_pixel + kl_weight * rate_per_pixel).mean()


def same_noise_groups(seed: int):
    """(fused, VDVAE) group functions that draw the same standard normals:
    sample_normal_kl's Philox stream, which fastvae.sample_normal reproduces
    for a generator in the same state (z = 0 + e^0 eps = eps)."""
    g_fused, g_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)

    def fused(qm, qv, pm, pv):
        return fused_group(qm, qv, pm, pv, generator=g_fused)

    def reference(qm, qv, pm, pv):
        eps, _ = fastvae.sample_normal(torch.zeros_like(qm), torch.zeros_like(qm), generator=g_ref)
        return torch.exp(qv) * eps + qm, gaussian_analytical_kl(qm, pm, qv, pv)

    return fused, reference


def agreement(model: TopDownVAE, x, seed: int) -> dict[str, float]:
    """The fused and VDVAE losses of one model on the same batch and the
    same noise: both values, and the largest gradient difference relative
    to the largest gradient."""
    fused, reference = same_noise_groups(seed)
    grads = []
    losses = []
    for loss_fn, group in ((fused_loss, fused), (vdvae_loss, reference)):
        model.zero_grad()
        loss = loss_fn(model, x, group)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad()
    scale = grads[1].abs().max().item()
    return dict(fused=losses[0], vdvae=losses[1], grad_rel_diff=(grads[0] - grads[1]).abs().max().item() / scale)


# -- evaluation --------------------------------------------------------------------------


def ratio_group(qm, qv, pm, pv):
    """z drawn from q with torch's generator, and log p(z) − log q(z) per example (the 0.5 log 2π cancel)."""
    eps = torch.randn_like(qm)
    z = qm + torch.exp(qv) * eps
    log_q = -0.5 * eps ** 2 - qv
    log_p = -0.5 * ((z - pm) * torch.exp(-pv)) ** 2 - pv
    return z, (log_p - log_q).sum(dim=(1, 2, 3))


def log_weights(model: TopDownVAE, x_rep):
    """The log-weight parts (n, B) for x_rep (n, B, 1, 8, 8): the samples are
    folded into the batch for the convolutions."""
    n, b = x_rep.shape[:2]
    xs = x_rep.reshape(n * b, *x_rep.shape[2:])
    params, ratios = model(xs, ratio_group)
    parts = {"log_px_z": log_px_z(xs, params).view(n, b)}
    for res, r in zip(RESOLUTIONS, ratios):
        parts[f"group_{res}x{res}"] = r.view(n, b)
    return parts


def bytes_per_sample(width: int) -> int:
    """What one sample of one digit holds during a no-grad forward, generously:
    32 activations of width x 8 x 8 float32 values."""
    return 32 * width * 64 * 4


def fastvae_log_px(model: TopDownVAE, x, k: int, seed: int, width: int, memory_budget: int | None):
    """fastvae.importance_log_likelihood's stats, the log-weights it saw
    (K, N), recorded in call order, the number of model calls and the most
    samples one call held."""
    seen, largest = [], [0]

    def fn(x_rep):
        if x_rep.shape[1] != x.shape[0]:  # the recording below stacks whole-batch chunks
            raise ValueError(f"memory_budget={memory_budget} splits the digits; give a larger one")
        parts = log_weights(model, x_rep)
        seen.append(sum(parts.values()))
        largest[0] = max(largest[0], x_rep.shape[0])
        return parts

    stats = fastvae.importance_log_likelihood(
        x, fn, k=k, return_stats=True, generator=torch.Generator().manual_seed(seed),
        bytes_per_sample=bytes_per_sample(width), memory_budget=memory_budget)
    return stats, torch.cat(seen), len(seen), largest[0]


def hand_written_log_px(model: TopDownVAE, x, k: int, chunk: int):
    """(log p̂(x), its delta-method standard error) per digit by a plain
    importance-sampling loop: its own draws, all (K, N) log-weights kept."""
    n = x.shape[0]
    lws = []
    for start in range(0, k, chunk):
        c = min(chunk, k - start)
        xs = x.repeat(c, 1, 1, 1)  # sample-major: row s * n + i is digit i
        params, ratios = model(xs, ratio_group)
        lws.append((log_px_z(xs, params) + sum(ratios)).view(c, n))
    lw = torch.cat(lws)
    w = torch.exp(lw - lw.max(0).values)
    stderr = w.std(0) / (w.mean(0) * math.sqrt(k))
    return torch.logsumexp(lw, 0) - math.log(k), stderr


def held_out_elbo(model: TopDownVAE, x):
    """Per-digit ELBO (nats) and the per-group KLs (batch means), one draw each."""
    params, kls = model(x, fused_group)
    terms = fastvae.hierarchical_elbo(x, None, kls, log_px=log_px_z(x, params), reduction="none")
    return terms.elbo, terms.kl_per_group.mean(0)


# -- training ----------------------------------------------------------------------------


def train_interleaved(models: dict, losses: dict, x, *, steps: int, warmup: int, batch: int = 100,
                      lr: float = 2e-3, seed: int = 0) -> dict[str, list[float]]:
    """Adam, the models' steps in turn on the same batches, the KL weight
    rising linearly from 0 to 1 over the first ``warmup`` steps (NVAE's
    warm-up: without it this small model switches its latents off early);
    each model's losses."""
    opts = {name: torch.optim.Adam(m.parameters(), lr=lr) for name, m in models.items()}
    history: dict[str, list[float]] = {name: [] for name in models}
    g = torch.Generator().manual_seed(seed)
    step = 0
    while step < steps:
        for idx in torch.randperm(len(x), generator=g).split(batch):
            if step == steps:
                break
            kl_weight = fastvae.kl_warmup(step, warmup) if warmup else 1.0
            for name, model in models.items():
                loss = losses[name](model, x[idx], kl_weight=kl_weight)
                opts[name].zero_grad()
                loss.backward()
                opts[name].step()
                history[name].append(loss.item())
            step += 1
    return history


def main(steps: int = 400, k: int = 1000, width: int = 16, zdim: int = 2, mixtures: int = 3, n_test: int = 100,
         seed: int = 0, warmup: int = 300, hand_chunk: int = 25, memory_budget: int | None = None) -> dict:
    train_px, test_px = load_digits("cpu", seed=seed)
    train_x, test_x = to_images(train_px), to_images(test_px[:n_test])
    torch.manual_seed(seed)
    base = TopDownVAE(width, zdim, mixtures)
    models = {"fused": base, "vdvae": copy.deepcopy(base)}  # the same initialization
    results = {"agreement_at_init": agreement(base, train_x[:100], seed)}
    history = train_interleaved(models, {"fused": fused_loss, "vdvae": vdvae_loss}, train_x, steps=steps,
                                warmup=warmup, seed=seed)
    results["agreement_trained"] = agreement(models["fused"], train_x[:100], seed)
    D, n = math.prod(test_x.shape[1:]), len(test_x)
    for name, model in models.items():
        model.eval()
        with torch.no_grad():
            torch.manual_seed(seed + 1)
            elbo, kl_groups = held_out_elbo(model, test_x)
            stats, seen, calls, largest = fastvae_log_px(model, test_x, k, seed + 2, width, memory_budget)
        ll = stats.log_likelihood.double()
        same = torch.logsumexp(seen.double(), 0) - math.log(k)  # the recorded weights, reduced by hand
        results[name] = dict(
            elbo=elbo.double().mean().item(), elbo_stderr=(elbo.double().std() / math.sqrt(n)).item(),
            bits_per_dim=-elbo.double().mean().item() / (D * math.log(2)), kl_per_group=kl_groups.tolist(),
            log_px=ll.mean().item(), stderr=(ll.std() / math.sqrt(n)).item(),
            mc_stderr=math.sqrt((stats.stderr.double() ** 2).sum().item()) / n,
            gap=(ll - elbo.double()).mean().item(), gap_stderr=((ll - elbo.double()).std() / math.sqrt(n)).item(),
            same_samples_max_diff=(ll - same).abs().max().item(),
            ess_fraction=stats.ess.double().mean().item() / k, pareto_high=int((stats.pareto_k > 0.7).sum()),
            samples_per_call=largest, calls=calls, train_loss=statistics.fmean(history[name][-20:]), per_digit=ll)
    # the hand-written loop, with its own draws, on the model trained with the fused calls
    fused = results["fused"]
    with torch.no_grad():
        torch.manual_seed(seed + 3)
        plain, plain_se = hand_written_log_px(models["fused"], test_x, k, hand_chunk)
    fused["log_px_plain"] = plain.double().mean().item()
    fused["mc_stderr_plain"] = math.sqrt((plain_se.double() ** 2).sum().item()) / n

    print(f"{steps} steps of 100 digits each (KL warm-up over {warmup}); {n} held-out digits (17 levels); "
          f"latents of {zdim} channels at "
          f"{', '.join(f'{r}x{r}' for r in RESOLUTIONS)}; width {width}; {mixtures} logistics per pixel")
    for when, key in (("initialization", "agreement_at_init"), ("the trained fused model", "agreement_trained")):
        a = results[key]
        print(f"same noise, at {when}: -ELBO/dim fused {a['fused']:.7f}, VDVAE {a['vdvae']:.7f} "
              f"(difference {a['fused'] - a['vdvae']:+.1e}); gradients differ by {a['grad_rel_diff']:.1e} "
              f"of the largest")
    groups = " / ".join(f"{r}x{r}" for r in RESOLUTIONS)
    print(f"| trained with | ELBO (nats/digit) | bits/dim | KL per group, {groups} | log p(x), K={k} (MC s.e.) | "
          f"log p(x) − ELBO | ESS/K | k̂ > 0.7 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, label in (("fused", "fastvae.sample_normal_kl + hierarchical_elbo"),
                        ("vdvae", "VDVAE's draw_gaussian_diag_samples + gaussian_analytical_kl")):
        r = results[name]
        kls = " / ".join(f"{v:.2f}" for v in r["kl_per_group"])
        print(f"| {label} | {r['elbo']:.3f} ± {r['elbo_stderr']:.3f} | {r['bits_per_dim']:.4f} | {kls} | "
              f"{r['log_px']:.3f} ± {r['stderr']:.3f} ({r['mc_stderr']:.4f}) | {r['gap']:.3f} ± "
              f"{r['gap_stderr']:.3f} | {r['ess_fraction']:.2f} | {r['pareto_high']} of {n} |")
    paired = fused["per_digit"] - results["vdvae"]["per_digit"]
    print(f"fused-trained minus VDVAE-trained log p(x), paired over digits: "
          f"{paired.mean().item():+.3f} ± {(paired.std() / math.sqrt(n)).item():.3f} nats (training noise)")
    diff = fused["log_px"] - fused["log_px_plain"]
    se = math.hypot(fused["mc_stderr"], fused["mc_stderr_plain"])
    print(f"fused-trained model, log p(x) at K={k}: fastvae.importance_log_likelihood {fused['log_px']:.4f}; the "
          f"same samples reduced by hand: largest difference per digit {fused['same_samples_max_diff']:.1e}; a "
          f"hand-written loop with its own draws {fused['log_px_plain']:.4f} (difference {diff:+.4f}, "
          f"{abs(diff) / se:.2f} combined MC s.e. of {se:.4f})")
    print(f"fastvae.importance_log_likelihood ran the model {fused['calls']} times on at most "
          f"{fused['samples_per_call']} samples x {n} digits (a chunk sized from its memory budget: K sets the "
          f"number of calls, not the memory); the hand-written loop holds all {k} x {n} log-weights")
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400, help="Adam steps of 100 digits, per model")
    p.add_argument("--warmup", type=int, default=300, help="steps of the KL weight's rise from 0 to 1 (0: none)")
    p.add_argument("--k", type=int, default=1000, help="importance samples per held-out digit")
    p.add_argument("--width", type=int, default=16, help="channels of the residual stream")
    p.add_argument("--zdim", type=int, default=2, help="latent channels per group")
    p.add_argument("--mixtures", type=int, default=3, help="logistic components per pixel")
    p.add_argument("--n-test", type=int, default=100, help="held-out digits evaluated (at most 297)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    main(a.steps, a.k, a.width, a.zdim, a.mixtures, a.n_test, a.seed, a.warmup)
