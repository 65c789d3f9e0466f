// zinb_log_prob on the CPU: the zero-inflated NB of scvi-tools (log mu, log theta, zero-inflation logits).
// The math and the row loops are shared with the other count likelihoods
// (count_likelihood.h); this file instantiates them for this op.
#include "count_likelihood.h"

namespace fastvae {

FASTVAE_COUNT_OP(zinb_log_prob, CountKind::kZINB)

}  // namespace fastvae
