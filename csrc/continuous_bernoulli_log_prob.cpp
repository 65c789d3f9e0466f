// continuous_bernoulli_log_prob on the CPU: bernoulli_log_prob's term plus
// the continuous Bernoulli's log normalizer log C(l). The formula, the
// normalizer's branches and the row loops are shared with bernoulli_log_prob
// (bernoulli_likelihood.h); this file instantiates them for this op.
#include "bernoulli_likelihood.h"
#include "likelihood.h"

namespace fastvae {

FASTVAE_BERNOULLI_OP(continuous_bernoulli_log_prob, BernoulliKind::kContinuous)

}  // namespace fastvae
