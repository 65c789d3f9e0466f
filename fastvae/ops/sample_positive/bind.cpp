// Python bindings of sample_positive (checked buffers -> sample_positive.cpp): the
// family samplers' binding (csrc/sampler_bind.h).
#include "sample_positive.h"
#include "sampler_bind.h"

namespace fastvae::bind {

// the KL family each family's fused KL takes: the exponential's, the Weibull's,
// the Kumaraswamy's (against a Beta)
constexpr int kPositiveKLFamilies[3] = {kFamilyKLExponential, kFamilyKLWeibull, kFamilyKLKumaraswamy};

void bind_sample_positive(py::module_& m) {
  bind_family_sampler(
      m,
      {"sample_positive", "log_p0", "log_p1", "dlog_p0", "dlog_p1", 3, "exponential, weibull, kumaraswamy",
       "prior_log_p0", "prior_log_p1", "dprior_log_p0", "dprior_log_p1", kPositiveKLFamilies},
      {fastvae::sample_positive_forward<float>, fastvae::sample_positive_backward<float>,
       fastvae::sample_positive_kl_forward<float>, fastvae::sample_positive_kl_backward<float>},
      {fastvae::sample_positive_forward<double>, fastvae::sample_positive_backward<double>,
       fastvae::sample_positive_kl_forward<double>, fastvae::sample_positive_kl_backward<double>});
}

FASTVAE_BIND(bind_sample_positive);

}  // namespace fastvae::bind
