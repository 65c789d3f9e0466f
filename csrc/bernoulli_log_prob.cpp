// bernoulli_log_prob on the CPU: out[k, p] = sum_d(x[p,d] l - softplus(l)),
// l = logits[k, p, d]. The formula and the row loops are shared with
// continuous_bernoulli_log_prob (bernoulli_likelihood.h); this file
// instantiates them for this op.
#include "bernoulli_likelihood.h"
#include "likelihood.h"

namespace fastvae {

FASTVAE_BERNOULLI_OP(bernoulli_log_prob, BernoulliKind::kBernoulli)

}  // namespace fastvae
