"""The main job (`python -m fastvae`): train a VAE on scikit-learn's handwritten
digits (1797 8x8 images that ship with the package: no download) with
fastvae.elbo, then an IWAE with fastvae.iwae; evaluate both on held-out digits;
time a training step against the same model trained with the hand-written
loss; and write a PNG of reconstructions, samples, the held-out bounds and
the step times.

Pixels (0..16) are divided by 16 and modelled as Bernoulli probabilities, so
every bound is in nats per image of *grey-scale* digits: a Bernoulli
likelihood of non-binary targets, not comparable with results on binarized
digits (or binarized MNIST), whose targets are 0 or 1. That "likelihood" is
unnormalized for values strictly inside (0, 1); ``--likelihood
continuous_bernoulli`` scores the same pixels with the normalized continuous
Bernoulli (Loaiza-Ganem and Cunningham 2019; fastvae.continuous_bernoulli_log_prob),
whose bounds are log-densities of [0, 1]-valued images (positive nats are
possible), comparable with neither. The report says which one it used.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fastvae


def _require(module: str, extra: str = "demo"):
    try:
        return __import__(module)
    except ImportError as e:  # the demo's two dependencies live in an extra
        raise SystemExit(
            f"the demo needs {module}: pip install -e '.[{extra}]' (or pip install scikit-learn matplotlib)"
        ) from e


def load_digits(device, n_test: int = 297, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) pixel tensors (N, 64) in [0, 1], float32, shuffled with seed."""
    datasets = _require("sklearn.datasets").datasets
    x = torch.tensor(datasets.load_digits().data, dtype=torch.float32) / 16.0
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x = x[perm].to(device)
    return x[n_test:], x[:n_test]


class VAE(nn.Module):
    """An MLP VAE, 64-hidden-latent-hidden-64, with a Bernoulli decoder."""

    def __init__(self, latent: int = 8, hidden: int = 256, data_dim: int = 64):
        super().__init__()
        self.latent = latent
        self.enc = nn.Sequential(nn.Linear(data_dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, data_dim))

    def encode(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z):  # logits
        return self.dec(z)


# -- the losses: fastvae's and the ones users write by hand -----------------------


LIKELIHOODS = ("bernoulli", "continuous_bernoulli")


def describe_likelihood(likelihood: str) -> str:
    """What the bounds measure, said in the report and on the plot."""
    if likelihood == "continuous_bernoulli":
        return ("the continuous Bernoulli (normalized) density of grey-scale pixels / 16: log-densities, "
                "not comparable with discrete likelihoods or with binarized digits")
    return ("a Bernoulli likelihood of grey-scale pixels / 16, not the continuous Bernoulli (unnormalized for "
            "grey values: --likelihood continuous_bernoulli normalizes it), not comparable with results on "
            "binarized digits")


def _hand_written_log_lik(logits, x, likelihood: str):
    if likelihood == "continuous_bernoulli":
        return torch.distributions.ContinuousBernoulli(logits=logits).log_prob(x.expand_as(logits)).sum(-1)
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)


def fastvae_elbo_loss(model: VAE, x, likelihood: str = "bernoulli"):
    mu, logvar = model.encode(x)
    return -fastvae.elbo(x, mu, logvar, model.decode, likelihood=likelihood)


def fastvae_iwae_loss(model: VAE, x, k: int, likelihood: str = "bernoulli"):
    mu, logvar = model.encode(x)
    return -fastvae.iwae(x, mu, logvar, model.decode, k=k, likelihood=likelihood, estimator="dreg")


def hand_written_elbo_loss(model: VAE, x, likelihood: str = "bernoulli"):
    mu, logvar = model.encode(x)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    rec = _hand_written_log_lik(model.decode(z), x, likelihood)
    kl = 0.5 * torch.sum(torch.exp(logvar) + mu**2 - 1 - logvar, dim=-1)
    return -(rec - kl).mean()


def hand_written_iwae_loss(model: VAE, x, k: int, likelihood: str = "bernoulli"):
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn((k, *mu.shape), dtype=mu.dtype, device=mu.device)
    logits = model.decode(z)
    rec = _hand_written_log_lik(logits, x, likelihood)
    log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = torch.distributions.Normal(mu, std).log_prob(z).sum(-1)
    return -(torch.logsumexp(rec + log_pz - log_qz, 0) - math.log(k)).mean()


# -- training and evaluation -------------------------------------------------------


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)  # per epoch
    # (epoch, held-out IWAE bound at k=50): closer to log p(x), where the IWAE
    # model's advantage shows (its ELBO is worse by design)
    test_iwae: list[tuple[int, float]] = field(default_factory=list)


def train(model: VAE, loss_fn, train_x, test_x, *, epochs: int, batch: int, lr: float = 1e-3,
          eval_every: int = 10, seed: int = 0, likelihood: str = "bernoulli") -> History:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    hist = History()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(train_x), generator=gen).to(train_x.device)
        total = torch.zeros((), device=train_x.device)  # summed on the device: no sync per step
        for i in range(0, len(train_x), batch):
            xb = train_x[perm[i:i + batch]]
            loss = loss_fn(model, xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(xb)
        hist.train_loss.append(total.item() / len(train_x))
        if epoch % eval_every == 0 or epoch == epochs:
            with torch.no_grad():
                mu, logvar = model.encode(test_x)
                iwae50 = fastvae.iwae(test_x, mu, logvar, model.decode, k=50, likelihood=likelihood)
            hist.test_iwae.append((epoch, iwae50.item()))
    return hist


@torch.no_grad()
def held_out_elbo(model: VAE, x, n_samples: int = 10, likelihood: str = "bernoulli") -> float:
    mu, logvar = model.encode(x)
    return fastvae.elbo(x, mu, logvar, model.decode, likelihood=likelihood, n_samples=n_samples).item()


@torch.no_grad()
def held_out_bounds(model: VAE, x, *, k_eval: int, likelihood: str = "bernoulli") -> dict[str, float]:
    """Mean nats per held-out image: the ELBO, the IWAE bound at k=50, and the
    importance-sampled log-likelihood with k_eval samples (Burda et al. 2015)."""
    mu, logvar = model.encode(x)
    log_px = fastvae.log_likelihood(x, model.encode, model.decode, k=k_eval, likelihood=likelihood).double()
    key = f"log p(x), K={k_eval}"
    return {
        "ELBO": held_out_elbo(model, x, likelihood=likelihood),
        "IWAE k=50": fastvae.iwae(x, mu, logvar, model.decode, k=50, likelihood=likelihood).item(),
        key: log_px.mean().item(),
        # the spread across digits, std / sqrt(N): what the held-out mean is uncertain by
        f"{key} stderr": (log_px.std() / math.sqrt(len(log_px))).item(),
    }


def time_step(model: VAE, loss_fns: dict, x, repeats: int = 30, block: int = 5) -> dict[str, float]:
    """Median milliseconds of one training step (forward, backward, Adam) per
    loss. Each round runs every loss for ``block`` consecutive steps, as a
    training loop does, the losses in a new random order each round so that
    load on the machine hits them alike. Consecutive, because a step right
    after a different, larger one (an IWAE step) starts with cold caches:
    measured here, an ELBO step right after an IWAE step took 0.05-0.5 ms
    longer, the fastvae one more than the hand-written one: a handicap no
    training loop has."""
    opt = torch.optim.Adam(model.parameters(), lr=0.0)  # lr 0: time steps, keep the model
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = {name: [] for name in loss_fns}
    order = list(loss_fns.items())
    shuffle = random.Random(0).shuffle
    for r in range(repeats + 3):
        shuffle(order)
        for name, fn in order:
            sync()
            t0 = time.perf_counter()
            for _ in range(block):
                loss = fn(model, x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sync()
            if r >= 3:  # warm-up
                times[name].append(1e3 * (time.perf_counter() - t0) / block)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def plot(path: Path, models: dict[str, VAE], histories: dict[str, History], test_x,
         bounds: dict[str, dict[str, float]], step_ms: dict[str, float], pairs: list[tuple[str, str]],
         likelihood: str = "bernoulli") -> Path:
    """Reconstructions and samples; below them, three panels that each compare
    like with like: one held-out bound (IWAE k=50) over the epochs for both
    models, the final held-out bounds estimator by estimator (the K = 5000
    log p(x) with its standard error across digits), and the step times of
    fastvae against the hand-written loss."""
    matplotlib = _require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 10
    fig = plt.figure(figsize=(14, 8), layout="constrained")
    grid = fig.add_gridspec(2, 3, height_ratios=[1.25, 1])
    with torch.no_grad():
        rows = [("held-out digits", test_x[:n])]
        samples = []
        for name, m in models.items():
            mu, _ = m.encode(test_x[:n])
            rows.append((f"{name}: reconstruction", torch.sigmoid(m.decode(mu))))
            gen = torch.Generator(device=test_x.device).manual_seed(1)
            z = torch.randn(n, m.latent, generator=gen, device=test_x.device)
            samples.append((f"{name}: samples", torch.sigmoid(m.decode(z))))
        rows += samples
    img_axes = grid[0, :].subgridspec(len(rows), n)
    for r, (label, imgs) in enumerate(rows):
        for c in range(n):
            ax = fig.add_subplot(img_axes[r, c])
            ax.imshow(imgs[c].reshape(8, 8).cpu().numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    ax_curve, ax_bounds, ax_time = (fig.add_subplot(grid[1, i]) for i in range(3))
    colors = dict(zip(models, ("C0", "C1")))
    for name, h in histories.items():  # one estimator, both models: the curves compare
        ax_curve.plot(*zip(*h.test_iwae), marker="s", color=colors[name], label=name)
    ax_curve.set(xlabel="epoch", ylabel="nats / image (higher is better)",
                 title="held-out IWAE k=50 bound while training")
    ax_curve.legend(fontsize=8)

    keys = [key for key in next(iter(bounds.values())) if not key.endswith("stderr")]
    for i, name in enumerate(models):  # estimator by estimator, the models side by side
        for j, key in enumerate(keys):
            x0, v = j + (i - (len(models) - 1) / 2) * 0.42, bounds[name][key]
            err = bounds[name].get(f"{key} stderr")
            ax_bounds.errorbar([x0], [v], yerr=None if err is None else [err], fmt="o", capsize=4,
                               color=colors[name], label=name if j == 0 else None)
            ax_bounds.annotate(f"{v:.2f}", (x0, v), xytext=(6, 0), textcoords="offset points", va="center",
                               fontsize=7)
    ax_bounds.set_xlim(-0.7, len(keys) - 0.15)
    ax_bounds.set_xticks(range(len(keys)), [k.replace(", ", "\n") for k in keys], fontsize=8)
    ax_bounds.set(ylabel="nats / image (higher is better)",
                  title=f"held-out bounds ({likelihood.replace('_', ' ')}, grey pixels / 16)")
    ax_bounds.legend(fontsize=8)

    labels = [ours.split(" ")[0].replace("fastvae.", "") + (f" {ours.split(' ')[1]}" if " " in ours else "")
              for ours, _ in pairs]
    for j, (ours, theirs) in enumerate(pairs):
        ax_time.bar(j - 0.2, step_ms[theirs], 0.4, color="0.6", label="hand-written loss" if j == 0 else None)
        ax_time.bar(j + 0.2, step_ms[ours], 0.4, color="C2", label="fastvae" if j == 0 else None)
        ax_time.annotate(f"{step_ms[theirs] / step_ms[ours]:.2f}x", (j + 0.2, step_ms[ours]), ha="center",
                         va="bottom", fontsize=9)
    ax_time.set_xticks(range(len(pairs)), labels)
    ax_time.set(ylabel="ms per training step (lower is better)",
                title="step time (x: speedup over hand-written)")
    ax_time.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(*, epochs: int = 100, batch: int = 100, k: int = 16, k_eval: int = 5000, latent: int = 8,
        out: str = "fastvae-digits.png", device: str | None = None, seed: int = 0,
        likelihood: str = "bernoulli") -> dict:
    """Trains, evaluates, times and plots; prints the report and returns its figures.
    likelihood: "bernoulli" (the default: grey pixels as Bernoulli targets) or
    "continuous_bernoulli" (the normalized continuous Bernoulli)."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    lik = likelihood
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    train_x, test_x = load_digits(device, seed=seed)
    print(f"fastvae {fastvae.__version__} on {device} ({torch.get_num_threads()} threads): "
          f"sample_normal, {lik}_log_prob, logmeanexp via the "
          f"{fastvae.backend_info(device)['sample_normal']} backend")
    print(f"digits: {len(train_x)} training and {len(test_x)} held-out 8x8 images; "
          f"VAE 64-256-{latent}-256-64, batch {batch}, {epochs} epochs each")
    print(f"likelihood={lik!r}: {describe_likelihood(lik)}")

    losses = {"VAE (fastvae.elbo)": lambda m, x: fastvae_elbo_loss(m, x, lik),
              f"IWAE k={k} (fastvae.iwae, DReG)": lambda m, x: fastvae_iwae_loss(m, x, k, lik)}
    models, histories, report = {}, {}, {"bounds": {}, "step_ms": {}}
    for name, loss_fn in losses.items():
        torch.manual_seed(seed)
        model = VAE(latent).to(device)
        t0 = time.perf_counter()
        histories[name] = train(model, loss_fn, train_x, test_x, epochs=epochs, batch=batch, seed=seed,
                                likelihood=lik)
        models[name] = model
        report.setdefault("train_loss", {})[name] = histories[name].train_loss
        print(f"trained {name} in {time.perf_counter() - t0:.1f} s")

    print(f"\nheld-out bounds, nats per image (higher is better; {len(test_x)} digits; "
          f"{describe_likelihood(lik)}):")
    names = list(models)
    bounds = {name: held_out_bounds(models[name], test_x, k_eval=k_eval, likelihood=lik) for name in names}
    print(f"  {'':<22}" + "".join(f"{n:>34}" for n in names))
    for key in bounds[names[0]]:
        if key.endswith("stderr"):
            continue
        err = f"{key} stderr"
        print(f"  {key:<22}" + "".join(
            f"{bounds[n][key]:>34.2f}" if err not in bounds[n] else f"{bounds[n][key]:>27.2f} ± {bounds[n][err]:.2f}"
            for n in names))
    report["bounds"] = bounds

    xb = train_x[:batch]
    step = time_step(VAE(latent).to(device), {
        "fastvae.elbo": lambda m, x: fastvae_elbo_loss(m, x, lik),
        "hand-written ELBO": lambda m, x: hand_written_elbo_loss(m, x, lik),
        f"fastvae.iwae k={k}": lambda m, x: fastvae_iwae_loss(m, x, k, lik),
        f"hand-written IWAE k={k}": lambda m, x: hand_written_iwae_loss(m, x, k, lik),
    }, xb)
    report["step_ms"] = step
    print(f"\ntime per training step (forward, backward, Adam; batch {batch}; median of 30 rounds of 5 steps):")
    pairs = [("fastvae.elbo", "hand-written ELBO"), (f"fastvae.iwae k={k}", f"hand-written IWAE k={k}")]
    for ours, theirs in pairs:
        print(f"  {ours:<20} {step[ours]:7.2f} ms   {theirs:<24} {step[theirs]:7.2f} ms   "
              f"({step[theirs] / step[ours]:.2f}x)")
    path = plot(Path(out), models, histories, test_x, bounds, step, pairs, likelihood=lik)
    print(f"\nwrote {path.resolve()} (reconstructions, samples, held-out bounds, step times)")
    report["png"] = str(path)
    report["likelihood"] = lik
    return report
