"""`python -m fastvae`: the main job, a VAE and an IWAE trained and evaluated on
scikit-learn's digits with fastvae (see fastvae/demo.py)."""
import argparse

from .demo import run


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Train a VAE (fastvae.elbo) and an IWAE (fastvae.iwae) on scikit-learn's digits, "
        "evaluate them on held-out digits, time a training step against the hand-written loss, "
        "and write a PNG of reconstructions, samples and training curves."
    )
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--k", type=int, default=16, help="importance samples per example when training the IWAE")
    p.add_argument("--k-eval", type=int, default=5000, help="importance samples for the held-out log p(x)")
    p.add_argument("--latent", type=int, default=8)
    p.add_argument("--out", default="fastvae-digits.png", help="where to write the PNG")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--likelihood", choices=("bernoulli", "continuous_bernoulli"), default="bernoulli",
                   help="how grey-scale pixels are scored: 'bernoulli' (grey values as Bernoulli targets, "
                   "unnormalized) or 'continuous_bernoulli' (the normalized continuous Bernoulli density)")
    args = p.parse_args(argv)
    return run(epochs=args.epochs, batch=args.batch, k=args.k, k_eval=args.k_eval, latent=args.latent,
               out=args.out, device=args.device, seed=args.seed, likelihood=args.likelihood)


if __name__ == "__main__":
    main()
