// The extension module fastvae._C: one bind_<op> call per op file. The
// checked NumPy-buffer boundary every binding goes through is in buffers.h;
// the GIL is released while kernels run.
#include "buffers.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastvae cpp backend (OpenMP kernels behind checked NumPy buffers)";
  fastvae::bind::bind_philox(m);
  fastvae::bind::bind_sample_normal(m);
  fastvae::bind::bind_kl_normal(m);
  fastvae::bind::bind_logmeanexp(m);
  fastvae::bind::bind_latent_log_ratio(m);
  fastvae::bind::bind_gaussian_log_prob(m);
  fastvae::bind::bind_bernoulli_log_prob(m);
}
