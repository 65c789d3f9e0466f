// bernoulli_log_prob and continuous_bernoulli_log_prob on the CPU. The
// formulas and the row loops are shared (bernoulli_likelihood.h); this file
// instantiates them once for each op.
#include "bernoulli_likelihood.h"

namespace fastvae {

// bernoulli_log_prob: out[k, p] = sum_d(x[p,d] l - softplus(l)), l = logits[k, p, d].
FASTVAE_BERNOULLI_OP(bernoulli_log_prob, BernoulliKind::kBernoulli)

// continuous_bernoulli_log_prob: bernoulli_log_prob's term plus the continuous
// Bernoulli's log normalizer log C(l), with its branches.
FASTVAE_BERNOULLI_OP(continuous_bernoulli_log_prob, BernoulliKind::kContinuous)

}  // namespace fastvae
