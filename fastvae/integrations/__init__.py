"""Adapters that score models written in other frameworks with fastvae's
large-K evaluation (docs/integrations.md). Each lives in its own module and
imports its framework only when called:

- :mod:`fastvae.integrations.pyro`: ``log_likelihood(model, guide, data)``, the
  per-example importance-sampled log p(x) of a Pyro model/guide pair
  (``pip install fastvae[integrations]``).
"""
