// What the samplers' C++ kernels share (sample_family's samplers and
// sample_concrete): log and exp in both precisions, log(1 - v) and the work
// item of a forward. Element i's uniform is the folded word of lane i % 4 of
// Philox counter i // 4 (csrc/philox.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "fastmath.h"
#include "ops.h"
#include "philox.h"
#include "rows.h"

namespace fastvae::sampler {

constexpr int64_t kTileElems = 8192;  // elements per parallel work item of the forward

// The float32 forms vectorize inside the ISA clones; float64 runs libm, the
// precise path, not the fast one.
FASTVAE_INLINE float log_t(float x) { return fast_log_positive(x); }
FASTVAE_INLINE double log_t(double x) { return std::log(x); }
FASTVAE_INLINE float exp_t(float x) { return fast_exp(x); }
FASTVAE_INLINE double exp_t(double x) { return std::exp(x); }

// log(1 - v) for v in [0, 1/2] to v's relative precision: log w corrected by
// the rounding of w = 1 - v (Goldberg), or -v where w rounds to 1 (the
// division is kept finite there, so that the select vectorizes).
FASTVAE_INLINE float log1m(float v) {
  const float w = 1.0f - v;
  const bool one = w == 1.0f;
  return one ? -v : fast_log_positive(w) * (-v / (one ? -1.0f : w - 1.0f));
}
FASTVAE_INLINE double log1m(double v) { return std::log1p(-v); }

}  // namespace fastvae::sampler
