"""A conditional VAE with fastvae: nothing special is needed, the decode
callable closes over the labels (and the encoder sees them too).

Trains on scikit-learn's digits for a few epochs, then draws one sample of
each class. Run: python examples/conditional_vae.py
"""
import torch
import torch.nn.functional as F
from torch import nn

import fastvae
from fastvae.demo import load_digits


def main(epochs: int = 30, latent: int = 4, batch: int = 100) -> float:
    from sklearn.datasets import load_digits as sk_digits

    torch.manual_seed(0)
    train_x, _ = load_digits("cpu")
    # the demo's split shuffles; recover the labels the same way
    labels = torch.tensor(sk_digits().target)[torch.randperm(1797, generator=torch.Generator().manual_seed(0))][297:]
    enc = nn.Sequential(nn.Linear(64 + 10, 256), nn.Tanh(), nn.Linear(256, 2 * latent))
    dec = nn.Sequential(nn.Linear(latent + 10, 256), nn.Tanh(), nn.Linear(256, 64))
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
    for epoch in range(epochs):
        for i in range(0, len(train_x), batch):
            x, y = train_x[i:i + batch], F.one_hot(labels[i:i + batch], 10).float()
            mu, logvar = enc(torch.cat([x, y], -1)).chunk(2, -1)

            def decode(z, y=y):  # z is (B, L), or (k, B, L) for iwae: broadcast the labels over k
                return dec(torch.cat([z, y.expand(*z.shape[:-1], 10)], -1))

            loss = -fastvae.iwae(x, mu, logvar, decode, k=8, likelihood="bernoulli", estimator="dreg")
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 10 == 9:
            print(f"epoch {epoch + 1}: training IWAE bound {-loss.item():.2f} nats")
    with torch.no_grad():  # one sample per class from the prior
        y = torch.eye(10)
        digits = torch.sigmoid(dec(torch.cat([torch.randn(10, latent), y], -1))).reshape(10, 8, 8)
    for row in range(8):
        print("  ".join("".join(" .:-=+*#%@"[min(9, int(v * 10))] for v in d[row]) for d in digits))
    return -loss.item()


if __name__ == "__main__":
    main()
