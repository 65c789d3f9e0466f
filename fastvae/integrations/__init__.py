"""Adapters that score models written in other frameworks with fastvae's
large-K evaluation (docs/integrations.md). Each lives in its own module and
imports its framework only when called:

- :mod:`fastvae.integrations.pyro`: ``log_likelihood(model, guide, data)``, the
  per-example importance-sampled log p(x) of a Pyro model/guide pair
  (``pip install fastvae[integrations]``).
- :mod:`fastvae.integrations.scvi`: ``marginal_ll(model, adata, indices)``, the
  per-cell log p(x) of a scvi-tools SCVI model (or one built on its VAE module).
- :mod:`fastvae.integrations.pythae`: ``log_likelihood(model, data)``, the
  per-example log p(x) of a pythae VAE with a Gaussian posterior.
"""
