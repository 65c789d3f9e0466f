"""The samplers' families: a kernel's ``family`` argument is the
position of the family's name in these tuples, a compile-time variant of the
C++ and Triton kernels.

The base layer (docs/architecture.md, "Layers"): it imports nothing of
fastvae, so that every layer that reads them takes them from here: the op
descriptions (their oracles and ahead-of-time cases), the front ends, which
turn a name into its index, and the latents' records.
"""
from __future__ import annotations

LOCATION_SCALE_FAMILIES = ("uniform", "laplace", "logistic", "gumbel", "cauchy")
POSITIVE_FAMILIES = ("exponential", "weibull", "kumaraswamy")
# the closed-form KLs of family_kl, each against a prior of its own family but
# the Kumaraswamy's, against a Beta (a family added goes at the end: the
# kernels' `family` of the others stays)
KL_FAMILIES = ("laplace", "uniform", "gumbel", "cauchy", "exponential", "kumaraswamy", "weibull")
# The Kumaraswamy-Beta KL: Nalisnick and Smyth's (2017) series, truncated at
# this many terms (its tail, ~ sum_m m^(-1-b), is what the truncation leaves
# out: small for b >~ 2, slow to converge for b < 1; docs/internals/latents.md). The C++
# and Triton kernels unroll the same count.
KUMARASWAMY_KL_TERMS = 10
