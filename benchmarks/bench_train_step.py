"""Benchmark of one VAE training step: fastvae.elbo and fastvae.iwae against the
loss written by hand, eager and under torch.compile.

What is measured
----------------
Two models, float32 (and each step again under torch.autocast in bfloat16:
the "... autocast" cases), decoders returning Bernoulli logits, on random inputs
(speed does not depend on the values); they are the training steps of the GPU
probe (benchmarks/README.md, "Columns"), so the suite and the probe time the
same steps:
  mlp   the MLP VAE of PyTorch's examples (784-400-20-400-784, ReLU) on
        binarized 784-pixel images. Bernoulli because that is the likelihood
        this architecture is used with (binarized MNIST, the IWAE paper's
        benchmark) and the one users copy from the examples.
        Cases "elbo" (batch 256, one sample per example) and "iwae k=50"
        (the decoder runs on 50 x 256 latents).
  conv  a DCGAN-like conv VAE on 3x64x64 images (CelebA-sized): four stride-2
        4x4 convolutions 3-64-128-256-512, a linear layer to 2 x 128 latents,
        and the mirror image with transposed convolutions; x in [0, 1].
        Cases "conv elbo" (batch 128) and "conv iwae k=8" (batch 64).
  gumbel a Gumbel-softmax VAE as public training scripts write it
        (784-512-256 MLP, 30 latents of 10 categories, temperature 1,
        batch 100, binarized 784-pixel images), only when asked (--models
        gumbel). Cases "gumbel elbo" (the relaxed sample) and "gumbel elbo
        hard" (straight-through one-hot); the hand-written loss draws the
        Gumbel noise with rand_like and two logs, softmaxes, takes BCE with
        logits and the analytic categorical KL against the uniform prior
        (the ELBO those scripts optimize); fastvae takes
        fastvae.Concrete(logits, 1.0, hard) with its default uniform prior.
  concrete the same model's sampler alone, only when asked (--models
        concrete): logits (100, 30, 10) as the parameter, and the loss
        sum(z * w) for fixed random weights w, so the backward reaches the
        sampler with a dense gradient. Cases "gumbel sampler" and "gumbel
        sampler hard": the hand-written Gumbel-softmax (rand_like, two logs,
        softmax; the straight-through one-hot for hard) against
        fastvae.sample_concrete(logits, 1.0, hard=hard).
        On CPU the conv cases run only when asked (--models mlp conv): on 2
        cores one step takes 5 s (ELBO) and 11 s (IWAE), 0.3-0.7 s at the
        --quick sizes (batch 4 for ELBO, batch 2 and k=2 for IWAE), and each
        torch.compile of a conv step about a minute, which the CPU suite
        cannot afford.
Implementations, side by side in one run:
  eager                 the loss as users write it: torch.randn_like noise,
                        binary_cross_entropy_with_logits against x expanded over
                        the k samples, the Gaussian log-densities written out
                        (not torch.distributions, whose argument validation would
                        only slow the baseline), torch.logsumexp;
  compiled              torch.compile of that same loss (dynamic=False);
  fastvae[<b>]          -fastvae.elbo / -fastvae.iwae(k=50) on backend <b>;
  fastvae[<b>]+compile  torch.compile(fullgraph=True) of the fastvae loss; if
                        fullgraph tracing fails, it is compiled with graph breaks
                        and the payload's "fastvae_compile" says why.
The encoder and decoder are the same module with the same weights everywhere.

Modes (as in every fastvae benchmark): forward = the loss with the autograd graph
built; backward = the gradients of all parameters (torch.autograd.grad, which
is loss.backward() without accumulating into .grad); fwd+bwd = one training
step without the optimizer. The optimizer update is the same for every
implementation (same parameters), so it is left out rather than added to every
figure alike. Memory: "activations MB" is what the forward keeps for the
backward beyond the parameters and x (the noise and x's k copies show up here),
"peak MB" (--memory) the peak of one step; common.py says how both are measured.
There is no bandwidth figure: the step is bound by its matrix products.
On CUDA each fwd+bwd row also has the per-call figures of every harness
benchmark (host us, kernels, GPU us, graph ms; benchmarks/README.md).

Reproduce (from the repository root):
  python -m benchmarks.bench_train_step [--quick] [--memory] [--models mlp conv]
Results go to benchmarks/results/train_step-<device-tag>.json (--out to override).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import fastvae
from fastvae.ops.gaussian_log_prob import LOG_2PI

from . import harness

OP = "train_step"


class MLPVAE(nn.Module):
    """pytorch/examples' VAE, with a logits output (the sigmoid goes into the likelihood)."""

    def __init__(self, d: int = 784, hidden: int = 400, latent: int = 20):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(d, hidden), nn.Linear(hidden, latent), nn.Linear(hidden, latent)
        self.fc3, self.fc4 = nn.Linear(latent, hidden), nn.Linear(hidden, d)

    def encode(self, x):
        h = F.relu(self.fc1(x))
        return self.fc21(h), self.fc22(h)

    def decode(self, z):  # z (B, L) or (k, B, L)
        return self.fc4(F.relu(self.fc3(z)))


class ConvVAE(nn.Module):
    """A DCGAN-like VAE for 3x64x64 images: 64x64 -> 4x4 in four stride-2
    convolutions, latent 128; the decoder mirrors it and returns logits."""

    def __init__(self, channels: int = 64, latent: int = 128):
        super().__init__()
        c = channels
        widths = [3, c, 2 * c, 4 * c, 8 * c]
        down = [m for i in range(4) for m in (nn.Conv2d(widths[i], widths[i + 1], 4, 2, 1), nn.ReLU())]
        self.encoder = nn.Sequential(*down, nn.Flatten(), nn.Linear(8 * c * 4 * 4, 2 * latent))
        self.fc = nn.Linear(latent, 8 * c * 4 * 4)
        up = [m for i in range(4, 1, -1) for m in (nn.ReLU(), nn.ConvTranspose2d(widths[i], widths[i - 1], 4, 2, 1))]
        self.decoder = nn.Sequential(*up, nn.ReLU(), nn.ConvTranspose2d(c, 3, 4, 2, 1))
        self.channels = c

    def encode(self, x):  # x (B, 3, 64, 64)
        return self.encoder(x).chunk(2, -1)

    def decode(self, z):  # z (B, L) or (k, B, L) -> logits (..., 3, 64, 64)
        h = self.fc(z.reshape(-1, z.shape[-1])).view(-1, 8 * self.channels, 4, 4)
        return self.decoder(h).view(*z.shape[:-1], 3, 64, 64)


class ConcreteLogits(nn.Module):
    """The Gumbel-softmax model's encoder output alone: logits (batch, latents, categories) as a parameter."""

    def __init__(self, batch: int = 100, latents: int = 30, categories: int = 10):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(batch, latents, categories))


class GumbelVAE(nn.Module):
    """A Gumbel-softmax VAE: 784-512-256 to ``latents`` x ``categories`` logits, and back."""

    def __init__(self, d: int = 784, latents: int = 30, categories: int = 10):
        super().__init__()
        self.shape = (latents, categories)
        self.encoder = nn.Sequential(nn.Linear(d, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                                     nn.Linear(256, latents * categories))
        self.decoder = nn.Sequential(nn.Linear(latents * categories, 256), nn.ReLU(), nn.Linear(256, 512),
                                     nn.ReLU(), nn.Linear(512, d))

    def encode(self, x):  # logits (B, L, C)
        return self.encoder(x).view(*x.shape[:-1], *self.shape)

    def decode(self, z):  # z (..., L, C) -> logits (..., 784)
        return self.decoder(z.flatten(-2))


def make_x(model: str, batch: int, device: torch.device) -> torch.Tensor:
    """Binarized 784-pixel vectors (mlp, gumbel), [0, 1] images (conv), (batch, *event);
    for the sampler alone (concrete), the loss's weights w (batch, 30, 10)."""
    g = torch.Generator().manual_seed(0)
    if model == "concrete":
        return torch.randn(batch, 30, 10, generator=g).to(device)
    if model in ("mlp", "gumbel"):
        return (torch.rand(batch, 784, generator=g) > 0.5).float().to(device)
    return torch.rand(batch, 3, 64, 64, generator=g).to(device)


# -- the losses (minimized: the negative bound, averaged over the batch) --------
# model is an MLPVAE or a ConvVAE; x is (B, *event), the likelihood sums over the event.


def handwritten_elbo(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn_like(std)
    logits = model.decode(z)
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    reconstruction = -bce.flatten(-(x.dim() - 1)).sum(-1)
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), -1)
    return -(reconstruction - kl).mean()


def handwritten_iwae(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn((k, *mu.shape), dtype=mu.dtype, device=mu.device)  # (k, B, L)
    logits = model.decode(z)
    bce = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
    log_px = -bce.flatten(-(x.dim() - 1)).sum(-1)
    log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
    log_qz = -0.5 * (((z - mu) / std).pow(2) + logvar + LOG_2PI).sum(-1)
    log_w = log_px + log_pz - log_qz
    return -(torch.logsumexp(log_w, 0) - math.log(k)).mean()


def fastvae_elbo(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    mu, logvar = model.encode(x)
    return -fastvae.elbo(x, mu, logvar, model.decode, likelihood="bernoulli")


def fastvae_iwae(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    mu, logvar = model.encode(x)
    return -fastvae.iwae(x, mu, logvar, model.decode, k=k, likelihood="bernoulli")


TEMPERATURE = 1.0


def handwritten_gumbel(model: nn.Module, x: torch.Tensor, k: int, hard: bool = False) -> torch.Tensor:
    logits = model.encode(x)
    u = torch.rand_like(logits)
    y = F.softmax((logits - torch.log(-torch.log(u + 1e-20) + 1e-20)) / TEMPERATURE, dim=-1)
    if hard:  # straight-through: the one-hot forward, the relaxed sample's gradient
        one_hot = torch.zeros_like(y).scatter_(-1, y.argmax(-1, keepdim=True), 1.0)
        y = (one_hot - y).detach() + y
    reconstruction = -F.binary_cross_entropy_with_logits(model.decode(y), x, reduction="none").sum(-1)
    log_q = F.log_softmax(logits, dim=-1)
    kl = (log_q.exp() * (log_q + math.log(logits.shape[-1]))).sum((-2, -1))
    return -(reconstruction - kl).mean()


def fastvae_gumbel(model: nn.Module, x: torch.Tensor, k: int, hard: bool = False) -> torch.Tensor:
    q = fastvae.Concrete(model.encode(x), TEMPERATURE, hard=hard)
    return -fastvae.elbo(x, q, model.decode, likelihood="bernoulli")


def handwritten_gumbel_sampler(model: nn.Module, w: torch.Tensor, k: int, hard: bool = False) -> torch.Tensor:
    logits = model.logits
    u = torch.rand_like(logits)
    y = F.softmax((logits - torch.log(-torch.log(u + 1e-20) + 1e-20)) / TEMPERATURE, dim=-1)
    if hard:
        one_hot = torch.zeros_like(y).scatter_(-1, y.argmax(-1, keepdim=True), 1.0)
        y = (one_hot - y).detach() + y
    return (y * w).sum()


def fastvae_gumbel_sampler(model: nn.Module, w: torch.Tensor, k: int, hard: bool = False) -> torch.Tensor:
    z, _ = fastvae.sample_concrete(model.logits, TEMPERATURE, hard=hard)
    return (z * w).sum()


LOSSES = {"elbo": (handwritten_elbo, fastvae_elbo), "iwae": (handwritten_iwae, fastvae_iwae)}


def under_autocast(loss):
    """The loss with its forward under torch.autocast in bfloat16 (the backward
    follows the forward's dtypes), on x's device: the usual mixed-precision
    step, for the hand-written loss and fastvae alike."""
    def step(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return loss(model, x, k)
    return step


LOSSES.update({f"{o} autocast": (under_autocast(h), under_autocast(f)) for o, (h, f) in list(LOSSES.items())})
# the Gumbel-softmax model's own objectives (its encoder returns logits)
LOSSES.update({"gumbel elbo": (handwritten_gumbel, fastvae_gumbel),
               "gumbel elbo hard": (lambda m, x, k: handwritten_gumbel(m, x, k, hard=True),
                                    lambda m, x, k: fastvae_gumbel(m, x, k, hard=True)),
               "gumbel sampler": (handwritten_gumbel_sampler, fastvae_gumbel_sampler),
               "gumbel sampler hard": (lambda m, w, k: handwritten_gumbel_sampler(m, w, k, hard=True),
                                       lambda m, w, k: fastvae_gumbel_sampler(m, w, k, hard=True))})
# the model each objective runs on (mlp and conv: the rest)
LOSS_MODELS = {"gumbel elbo": "gumbel", "gumbel elbo hard": "gumbel", "gumbel sampler": "concrete",
               "gumbel sampler hard": "concrete"}


def compile_fullgraph(fn, notes: dict, key: str):
    """torch.compile(fn, fullgraph=True), falling back to a compile with graph
    breaks if tracing fails; notes[key] records which one ran and why."""
    compiled = {"fullgraph": torch.compile(fn, fullgraph=True, dynamic=False)}

    def call(*args):
        if key not in notes:  # the first call traces
            try:
                out = compiled["fullgraph"](*args)
                notes[key] = {"fullgraph": True}
                return out
            except Exception as e:  # noqa: BLE001 - any tracing failure is the finding
                notes[key] = {"fullgraph": False, "error": f"{type(e).__name__}: {e}"[:2000]}
                compiled["fullgraph"] = torch.compile(fn, dynamic=False)
        return compiled["fullgraph"](*args)

    return call


def make_impls(models: dict[str, nn.Module], backends: list[str], notes: dict) -> list[harness.Impl]:
    """Every implementation takes (model, objective, x, k): model a key of
    ``models``, objective a key of LOSSES. One compiled function per (model,
    objective), so that each traces one loss on one module."""

    def per_loss(which: int, wrap=lambda fn, key: fn):  # which: 0 handwritten, 1 fastvae
        return {(m, o): wrap(lambda x, k, f=fs[which], model=model: f(model, x, k), f"{m} {o}")
                for m, model in models.items() for o, fs in LOSSES.items() if LOSS_MODELS.get(o, m) == m
                and (o in LOSS_MODELS or m in ("mlp", "conv"))}

    eager = per_loss(0)
    hand = per_loss(0, lambda fn, key: torch.compile(fn, dynamic=False))
    impls = [harness.Impl("eager", lambda m, o, x, k: eager[(m, o)](x, k)),
             harness.Impl("compiled", lambda m, o, x, k: hand[(m, o)](x, k))]
    if not (hasattr(fastvae, "elbo") and hasattr(fastvae, "iwae")):
        notes["missing"] = "fastvae.elbo / fastvae.iwae not in this fastvae: only the baselines were timed"
        return impls
    ours = per_loss(1)
    for b in backends:
        full = per_loss(1, lambda fn, key, b=b: compile_fullgraph(fn, notes, f"{key} [{b}]"))
        impls += [harness.Impl(f"fastvae[{b}]", lambda m, o, x, k: ours[(m, o)](x, k), b),
                  harness.Impl(f"fastvae[{b}]+compile", lambda m, o, x, k, full=full: full[(m, o)](x, k), b)]
    return impls


def sizes(quick: bool, models: list[str], batch: int | None, k: int | None) -> list[tuple]:
    """(label, model, objective, batch, k) of every case; --batch and -k set the mlp's."""
    out = []
    if "mlp" in models:
        b, kk = batch or (32 if quick else 256), k or (5 if quick else 50)
        out += [("elbo", "mlp", "elbo", b, 1), (f"iwae k={kk}", "mlp", "iwae", b, kk),
                ("elbo autocast", "mlp", "elbo autocast", b, 1),
                (f"iwae k={kk} autocast", "mlp", "iwae autocast", b, kk)]
    if "conv" in models:
        (eb, ib, kk) = (4, 2, 2) if quick else (128, 64, 8)
        out += [("conv elbo", "conv", "elbo", eb, 1), (f"conv iwae k={kk}", "conv", "iwae", ib, kk),
                ("conv elbo autocast", "conv", "elbo autocast", eb, 1),
                (f"conv iwae k={kk} autocast", "conv", "iwae autocast", ib, kk)]
    if "gumbel" in models:
        b = 16 if quick else 100
        out += [("gumbel elbo", "gumbel", "gumbel elbo", b, 1),
                ("gumbel elbo hard", "gumbel", "gumbel elbo hard", b, 1)]
    if "concrete" in models:  # (100, 30, 10) at --quick too: a call is mostly its host cost
        out += [("gumbel sampler", "concrete", "gumbel sampler", 100, 1),
                ("gumbel sampler hard", "concrete", "gumbel sampler hard", 100, 1)]
    return out


def cases(models: dict[str, nn.Module], case_sizes: list[tuple]) -> list[harness.Case]:
    def make(model, objective, batch, k):
        def inputs(device):
            x = make_x(model, batch, device)
            return (model, objective, x, k), list(models[model].parameters()), torch.ones((), device=device)
        return inputs

    return [harness.Case(label, {"model": model, "objective": objective, "batch": batch, "k": k},
                         make(model, objective, batch, k)) for label, model, objective, batch, k in case_sizes]


MODELS = {"mlp": MLPVAE, "conv": ConvVAE, "gumbel": GumbelVAE, "concrete": ConcreteLogits}


def default_models(device: torch.device) -> list[str]:
    """Both on CUDA (the GPU probe's four steps); the mlp alone on CPU (see the docstring)."""
    return ["mlp", "conv"] if device.type == "cuda" else ["mlp"]


TITLES = {"mlp": "MLP VAE 784-400-20-400-784", "conv": "conv VAE 3x64x64, latent 128",
          "gumbel": "Gumbel-softmax VAE 784-512-256-30x10-256-512-784",
          "concrete": "the Gumbel-softmax sampler alone, logits (100, 30, 10)"}


def main(argv=None) -> dict | None:
    p = harness.parser(__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=None, help="mlp batch size (default 256, 32 with --quick)")
    p.add_argument("-k", type=int, default=None, help="mlp IWAE samples (default 50, 5 with --quick)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=None,
                   help="models to time (default: mlp conv on CUDA, mlp on CPU, where a conv step takes seconds)")
    args = harness.parse_args(p, argv)
    device = torch.device(args.device)
    names = args.models or default_models(device)
    backends = args.fastvae_backends or [harness.default_fastvae_backend(device, "sample_normal")]
    torch.manual_seed(0)
    models = {m: MODELS[m]().to(device) for m in MODELS if m in names}
    notes: dict = {}
    title = "one training step, float32 and under bfloat16 autocast, Bernoulli: " + ", ".join(TITLES[m] for m in models)
    case_sizes = sizes(args.quick, names, args.batch, args.k)
    return harness.run(__spec__.name, OP, title, cases(models, case_sizes), make_impls(models, backends, notes), args,
                       {"fastvae_compile": notes})


if __name__ == "__main__":
    main()
