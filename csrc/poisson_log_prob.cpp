// poisson_log_prob on the CPU: Poisson(x; e^log_rate): sum_d(x l - e^l) - sum_d lgamma(x + 1), the lgamma sum once per x row.
// The math and the row loops are shared with the other count likelihoods
// (count_likelihood.h); this file instantiates them for this op.
#include "count_likelihood.h"

namespace fastvae {

FASTVAE_COUNT_OP(poisson_log_prob, CountKind::kPoisson)

}  // namespace fastvae
