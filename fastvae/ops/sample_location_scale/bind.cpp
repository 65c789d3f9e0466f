// Python bindings of sample_location_scale (checked buffers ->
// sample_location_scale.cpp): the family samplers' binding (csrc/sampler_bind.h).
#include "sample_location_scale.h"
#include "sampler_bind.h"

namespace fastvae::bind {

void bind_sample_location_scale(py::module_& m) {
  bind_family_sampler(
      m,
      {"sample_location_scale", "loc", "log_scale", "dloc", "dlog_scale", 5,
       "uniform, laplace, logistic, gumbel, cauchy", "prior_loc", "prior_log_scale", "dprior_loc",
       "dprior_log_scale"},
      {fastvae::sample_location_scale_forward<float>, fastvae::sample_location_scale_backward<float>,
       fastvae::sample_location_scale_kl_forward<float>, fastvae::sample_location_scale_kl_backward<float>},
      {fastvae::sample_location_scale_forward<double>, fastvae::sample_location_scale_backward<double>,
       fastvae::sample_location_scale_kl_forward<double>, fastvae::sample_location_scale_kl_backward<double>});
}

FASTVAE_BIND(bind_sample_location_scale);

}  // namespace fastvae::bind
