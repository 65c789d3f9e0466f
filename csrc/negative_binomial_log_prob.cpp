// negative_binomial_log_prob on the CPU: NB(x; mu, theta) in scvi-tools' parameterization (log mu, log theta), theta per element or per gene.
// The math and the row loops are shared with the other count likelihoods
// (count_likelihood.h); this file instantiates them for this op.
#include "count_likelihood.h"

namespace fastvae {

FASTVAE_COUNT_OP(negative_binomial_log_prob, CountKind::kNB)

}  // namespace fastvae
