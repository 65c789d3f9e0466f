"""fastvae: fused kernels for training and evaluating VAEs in PyTorch.

Ops (each a torch.library custom op in the namespace "fastvae" with Triton
(CUDA), C++ (CPU) and plain-PyTorch reference backends):

- sample_normal(mu, logvar, n_samples=None, *, generator=None) -> (z, kl)
- kl_normal(mu, logvar, prior_mu=None, prior_logvar=None) -> kl
- gaussian_log_prob(x, mean, logvar=None, *, scale=None, softplus_var=None, delta=1e-6)
- bernoulli_log_prob(x, logits)

backend_info(device) reports which backend serves each op.
"""
from ._backend import backend_info
from .bernoulli_log_prob import bernoulli_log_prob
from .gaussian_log_prob import gaussian_log_prob
from .kl_normal import kl_normal
from .sample_normal import sample_normal

__all__ = [
    "sample_normal",
    "kl_normal",
    "gaussian_log_prob",
    "bernoulli_log_prob",
    "backend_info",
]
__version__ = "0.1.0"
