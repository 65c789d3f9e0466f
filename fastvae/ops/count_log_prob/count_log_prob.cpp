// The count likelihoods on the CPU: the math and the row loops are shared
// (count_log_prob.h); this file instantiates them for each op:
// - poisson_log_prob: Poisson(x; e^log_rate): sum_d(x l - e^l) - sum_d lgamma(x + 1), the lgamma sum once per x row;
// - negative_binomial_log_prob: NB(x; mu, theta) in scvi-tools' parameterization (log mu, log theta), theta per
//   element or per gene;
// - zinb_log_prob: the zero-inflated NB of scvi-tools (log mu, log theta, zero-inflation logits).
#include "count_log_prob.h"

namespace fastvae {

FASTVAE_COUNT_OP(poisson_log_prob, CountKind::kPoisson)
FASTVAE_COUNT_OP(negative_binomial_log_prob, CountKind::kNB)
FASTVAE_COUNT_OP(zinb_log_prob, CountKind::kZINB)

}  // namespace fastvae
