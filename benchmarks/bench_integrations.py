"""Benchmark of the fastvae.integrations adapters against each framework's
own estimator of log p(x): the Pyro tutorial VAE against Pyro's importance
sampler run one example at a time (the loop users wrote, since
vectorized_importance_weights on a batch estimates the joint), scvi-tools'
SCVI against its get_marginal_ll, a pythae VAE against its get_nll.

What is measured
----------------
The Pyro VAE tutorial's model and guide (float32, random weights): encoder
784 -> 400 (softplus) -> (z_loc, z_scale) of L = 50, decoder 50 -> 400
(softplus) -> 784 Bernoulli probabilities (sigmoid), z under
pyro.plate("data"); B random binary examples (default B = 256) at
K = 1000 and 5000:

  fastvae[pyro]   fastvae.integrations.pyro.log_likelihood(model, guide, x, k=K):
                  all B examples per chunk, chunks sized from fastvae's default
                  memory budget, streamed;
  pyro loop       for each example, pyro.infer.importance.vectorized_importance_weights(
                  model, guide, x[i:i+1], num_samples=K, max_plate_nesting=1),
                  then logsumexp - log K.

scvi-tools' SCVI (--frameworks scvi; ZINB, observed library, 2 batches,
random weights): G = 1000 genes, n_hidden = 128, n_latent = 10, one hidden
layer (scVI's defaults but G); B synthetic negative-binomial cells:

  fastvae[scvi]         fastvae.integrations.scvi.marginal_ll(model, indices=range(B), k=K);
  scvi get_marginal_ll  model.get_marginal_ll(indices=range(B), n_mc_samples=K,
                        return_mean=False): its defaults, batches of 128 cells,
                        one sample per forward pass.

A pythae VAE (--frameworks pythae; random weights): its default MLP encoder
and decoder (784 -> 512 -> L = 16, Bernoulli "bce" reconstruction), B random
binary examples:

  fastvae[pythae]   fastvae.integrations.pythae.log_likelihood(model, x, k=K);
  pythae get_nll    model.get_nll(x, n_samples=K): its default batch_size of 100
                    samples, one example at a time (it returns the batch mean).

Each (implementation, K, repeat) runs in a fresh subprocess, round-robin
(repeat 1 of every case, then repeat 2, ...): one untimed call at K = 10, then
one timed call (time.perf_counter, under torch.no_grad). Peak memory: on the
CPU the peak RSS during the timed call (ru_maxrss after it) above the RSS just
before it (/proc/self/statm), with glibc's mmap threshold fixed
(common.run_child_json) so RSS follows the live tensors; on CUDA
torch.cuda.max_memory_allocated above what was allocated before. The mean
log p̂(x) of each is recorded as a check: the noise differs, so they agree to
Monte Carlo error, not exactly (random weights: the weights are degenerate and
the evaluation warns; the timing does not depend on it).

The fastvae rows use fastvae's default memory budget (recorded as
memory_budget_mb), against which their peak is measured.

Reproduce (from the repository root; needs pip install -e ".[integrations]"):
  python -m benchmarks.bench_integrations               # full run: Pyro, B=256, K=1000 and 5000, 3 repeats
  python -m benchmarks.bench_integrations --frameworks scvi pythae   # the scVI and pythae rows
  python -m benchmarks.bench_integrations --quick       # smoke run: B=8, K=50 and 100, tiny models, 1 repeat
Results go to benchmarks/results/integrations-<device-tag>.json (--out to override).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

import torch

from . import common

# per framework: (the adapter, the framework's own estimator)
IMPLS = {"pyro": ("fastvae[pyro]", "pyro loop"), "scvi": ("fastvae[scvi]", "scvi get_marginal_ll"),
         "pythae": ("fastvae[pythae]", "pythae get_nll")}
# per framework: the model's sizes, full and --quick (Pyro's: --dims)
SIZES = {"scvi": ([1000, 128, 10], [20, 8, 2]), "pythae": ([784, 16], [32, 2])}


def tutorial_vae(d: int, h: int, latent: int):
    """The Pyro VAE tutorial's model and guide (random weights, seed 0)."""
    import pyro
    import pyro.distributions as dist
    from torch import nn

    torch.manual_seed(0)
    fc1, fc21, fc22 = nn.Linear(d, h), nn.Linear(h, latent), nn.Linear(h, latent)
    dec = nn.Sequential(nn.Linear(latent, h), nn.Softplus(), nn.Linear(h, d), nn.Sigmoid())

    def encoder(x):
        hidden = nn.functional.softplus(fc1(x))
        return fc21(hidden), torch.exp(fc22(hidden))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], latent)))
            z_scale = x.new_ones(torch.Size((x.shape[0], latent)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            pyro.sample("obs", dist.Bernoulli(dec(z), validate_args=False).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))

    return model, guide


def pyro_loop(model, guide, x: torch.Tensor, k: int) -> torch.Tensor:
    """Pyro's importance weights one example per call: (B,) log p̂(x_i)."""
    from pyro.infer.importance import vectorized_importance_weights

    out = []
    for i in range(x.shape[0]):
        lw, _, _ = vectorized_importance_weights(model, guide, x[i:i + 1], num_samples=k, max_plate_nesting=1)
        out.append(torch.logsumexp(lw, 0) - math.log(k))
    return torch.stack(out)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def scvi_model(genes: int, hidden: int, latent: int, cells: int):
    """An SCVI model (ZINB, observed library, 2 batches, random weights) on
    synthetic negative-binomial counts of ``cells`` cells."""
    import anndata
    import numpy as np
    import scvi

    scvi.settings.seed = 0
    counts = np.random.default_rng(1).negative_binomial(2, 0.3, size=(cells, genes)).astype(np.float32)
    counts[counts.sum(1) == 0, 0] = 1  # an observed library of 0 counts has no log
    adata = anndata.AnnData(counts)
    adata.obs["batch"] = np.where(np.arange(cells) % 2, "a", "b")
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata, n_hidden=hidden, n_latent=latent, n_layers=1)
    model.module.eval()
    return model


def pythae_model(d: int, latent: int):
    """A pythae VAE with its default MLP networks (random weights, seed 0)."""
    from pythae.models import VAE, VAEConfig

    torch.manual_seed(0)
    return VAE(VAEConfig(input_dim=(d,), latent_dim=latent, reconstruction_loss="bce")).eval()


def child(args) -> dict:
    """One timed call of one implementation in this fresh process."""
    import warnings

    impl, k = args.child[0], int(args.child[1])
    framework = next(f for f, impls in IMPLS.items() if impl in impls)
    if framework == "pyro":
        from fastvae.integrations.pyro import log_likelihood

        d, h, latent = args.dims
        model, guide = tutorial_vae(d, h, latent)
        x = (torch.rand(args.examples, d, generator=torch.Generator().manual_seed(1)) < 0.5).float()

        def run(kk):
            if impl == "pyro loop":
                return pyro_loop(model, guide, x, kk)
            return log_likelihood(model, guide, x, k=kk, generator=torch.Generator().manual_seed(2))
    elif framework == "scvi":
        from fastvae.integrations.scvi import marginal_ll

        model = scvi_model(*args.dims, cells=args.examples)
        cells = list(range(args.examples))

        def run(kk):
            if impl == "scvi get_marginal_ll":
                return model.get_marginal_ll(indices=cells, n_mc_samples=kk, return_mean=False)
            return marginal_ll(model, indices=cells, k=kk, generator=torch.Generator().manual_seed(2))
    else:
        from fastvae.integrations.pythae import log_likelihood

        model = pythae_model(*args.dims)
        x = (torch.rand(args.examples, args.dims[0], generator=torch.Generator().manual_seed(1)) < 0.5).float()

        def run(kk):
            if impl == "pythae get_nll":
                return torch.tensor(model.get_nll(x, n_samples=kk))  # the batch mean: all it returns
            return log_likelihood(model, x, k=kk, generator=torch.Generator().manual_seed(2))

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: degenerate weights, as expected
        run(10)
        before = rss_bytes()
        start = time.perf_counter()
        ll = run(k)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"impl": impl, "framework": framework, "case": f"K={k}", "k": k, "seconds": seconds,
            "peak_rss_above_mb": max(peak - before, 0) / 2**20, "mean_log_px": float(ll.mean())}


def main(argv=None) -> dict:
    from fastvae.evaluation import memory_budget_for

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, B=8, K=50 and 100, 1 repeat: a smoke run")
    p.add_argument("--device", default="cpu", help="cpu only (the models are built there)")
    p.add_argument("--frameworks", nargs="+", default=["pyro"], choices=list(IMPLS),
                   help="whose adapter and own estimator to time (default: pyro)")
    p.add_argument("--examples", type=int, default=None, help="B (default 256; 8 with --quick)")
    p.add_argument("--ks", type=int, nargs="+", default=None, help="K values (default 1000 5000)")
    p.add_argument("--repeats", type=int, default=None, help="fresh processes per case (default 3)")
    p.add_argument("--memory", action="store_true", help="accepted for the suite; memory is always measured")
    p.add_argument("--out", default=None)
    p.add_argument("--child", nargs=2, metavar=("IMPL", "K"), help=argparse.SUPPRESS)
    p.add_argument("--dims", type=int, nargs="+", default=None,
                   help="the Pyro model's D H L (default 784 400 50; 32 16 4 with --quick)")
    p.add_argument("--scvi-dims", type=int, nargs=3, default=None, metavar=("G", "H", "L"),
                   help="SCVI's genes, n_hidden, n_latent (default 1000 128 10; 20 8 2 with --quick)")
    p.add_argument("--pythae-dims", type=int, nargs=2, default=None, metavar=("D", "L"),
                   help="the pythae VAE's input and latent sizes (default 784 16; 32 2 with --quick)")
    args = p.parse_args(argv)
    args.examples = args.examples or (8 if args.quick else 256)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    dims = {"pyro": args.dims or ([32, 16, 4] if args.quick else [784, 400, 50]),
            "scvi": args.scvi_dims or SIZES["scvi"][1 if args.quick else 0],
            "pythae": args.pythae_dims or SIZES["pythae"][1 if args.quick else 0]}
    ks = args.ks or ([50, 100] if args.quick else [1000, 5000])
    repeats = args.repeats or (1 if args.quick else 3)
    device = torch.device(args.device)
    if device.type != "cpu":
        raise SystemExit(f"bench_integrations: the models are built on the CPU; got --device {args.device}")
    meta = common.metadata(device)
    budget_mb = memory_budget_for(device) / 2**20
    runs = []
    for r in range(repeats):  # round-robin: slow drifts of a shared machine hit every case alike
        for k in ks:
            for framework in args.frameworks:
                for impl in IMPLS[framework]:
                    rec = common.run_child_json(
                        ["benchmarks.bench_integrations", "--child", impl, str(k), "--device", args.device,
                         "--examples", str(args.examples), "--dims", *map(str, dims[framework])], timeout=1800)
                    common.log(f"repeat {r + 1}: {impl} K={k}: {rec['seconds']:.2f} s, "
                               f"peak +{rec['peak_rss_above_mb']:.0f} MB")
                    runs.append(rec)
    results = []
    for framework in args.frameworks:
        for k in ks:
            for impl in IMPLS[framework]:
                mine = [x for x in runs if x["impl"] == impl and x["k"] == k]
                results.append({"impl": impl, "framework": framework, "case": f"K={k}", "k": k,
                                "median_s": statistics.median(x["seconds"] for x in mine),
                                "seconds": [x["seconds"] for x in mine],
                                "peak_rss_above_mb": statistics.median(x["peak_rss_above_mb"] for x in mine),
                                "mean_log_px": statistics.median(x["mean_log_px"] for x in mine)})
    rows = []
    for framework in args.frameworks:
        for k in ks:
            ours, theirs = (next(x for x in results if x["impl"] == i and x["k"] == k) for i in IMPLS[framework])
            ours["speedup_vs_framework"] = theirs["median_s"] / ours["median_s"]
            ours["peak_over_budget"] = ours["peak_rss_above_mb"] / budget_mb
            if framework == "pyro":
                ours["speedup_vs_pyro_loop"] = ours["speedup_vs_framework"]
            for rec in (ours, theirs):
                rows.append([f"K={k}", rec["impl"], f"{rec['median_s']:.2f}", f"{rec['peak_rss_above_mb']:.0f}",
                             f"{rec['mean_log_px']:.2f}",
                             common.fmt_ratio(rec.get("speedup_vs_framework")) if rec is ours else ""])
    table = common.markdown_table(["case", "impl", "median s", "peak RSS +MB", "mean log p̂(x)", "speedup"], rows)
    models = {"pyro": f"the Pyro tutorial VAE ({'->'.join(map(str, dims['pyro']))}) against Pyro's per-example "
                      f"vectorized_importance_weights loop",
              "scvi": f"SCVI (ZINB, {dims['scvi'][0]} genes, n_hidden {dims['scvi'][1]}, n_latent "
                      f"{dims['scvi'][2]}) against its get_marginal_ll",
              "pythae": f"a pythae VAE ({dims['pythae'][0]}->512->{dims['pythae'][1]}, bce) against its get_nll"}
    payload = {"op": "integrations", **meta, "examples": args.examples, "frameworks": args.frameworks,
               "dims": {f: dims[f] for f in args.frameworks}, "repeats": repeats, "memory_budget_mb": budget_mb,
               "title": (f"B={args.examples}, fastvae.integrations against each framework's own estimator: "
                         + "; ".join(models[f] for f in args.frameworks)
                         + f"; medians of {repeats} fresh processes"),
               "results": results, "table_markdown": table}
    path = common.write_json(common.result_path("integrations", device, args.quick, args.out), payload)
    common.log(f"wrote {path}")
    print(table)
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
