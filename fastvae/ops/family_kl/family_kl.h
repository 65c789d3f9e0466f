// family_kl's C++ kernels (family_kl.cpp), for its binding (bind.cpp). As in
// csrc/ops.h, the callers have checked every extent; these trust them.
#pragma once

#include <cstdint>
#include <vector>

namespace fastvae {

constexpr int kFamilyKLFamilies = 7;  // KL_FAMILIES (fastvae/_families.py)
constexpr int kFamilyKLExponential = 4;
constexpr int kFamilyKLKumaraswamy = 5;
constexpr int kFamilyKLWeibull = 6;

// Whether a KL family's q and p have a location (q_loc, p_loc): all but the exponential.
inline bool family_kl_has_loc(int family) { return family != kFamilyKLExponential; }

// Whether a KL family is a location-scale one's (the families before the
// exponential in KL_FAMILIES; the positive families' come after it).
inline bool family_kl_location_scale(int family) { return family >= 0 && family < kFamilyKLExponential; }

// The parameters of one call: q's (N, L); p's (N, L), or (L,) when p_shared.
// q_loc and p_loc are null for the exponential, whose log-rates sit in the
// log_param arrays (the log-scales of the location-scale families); the
// Kumaraswamy's (log a, log b) and its Beta prior's (log alpha, log beta), and
// the Weibull's (log scale, log concentration), sit in (loc, log_param).
// A shared prior may come with a periodic copy (FamilyKLPeriodicPrior's), so
// that the kernels read a block's columns in place of tiling them per block.
template <typename T>
struct FamilyKLIn {
  const T* q_loc;
  const T* q_log_param;
  const T* p_loc;
  const T* p_log_param;
  bool p_shared;
  int64_t N, L;
  const T* p_loc_periodic = nullptr;  // p_loc[j % L] for j < L + 512, or null
  const T* p_log_param_periodic = nullptr;
  // family_kl_add_backward's block of q's log-params, in place of
  // q_log_param + e0, or null (a sampler that takes scales logs them per block)
  const T* q_log_param_block = nullptr;
};

// The periodic copy of a shared prior with L < 512, made once per call by a
// caller that runs family_kl_add_backward per block (the samplers' hooks),
// and attached to its FamilyKLIn: element e of a block starting at column c
// reads copy[c + e] (c + e < L + 512). Nothing for a prior per row or L >= 512
// (a block of at most 512 elements then reads the prior in place unless it
// crosses a row's end).
template <typename T>
class FamilyKLPeriodicPrior {
 public:
  explicit FamilyKLPeriodicPrior(FamilyKLIn<T>& in) {
    if (!in.p_shared || in.L <= 0 || in.L >= 512) return;
    const int64_t len = in.L + 512;
    copy_.resize(static_cast<size_t>(2 * len));
    for (int64_t j = 0; j < len; ++j) copy_[size_t(j)] = in.p_log_param[j % in.L];
    in.p_log_param_periodic = copy_.data();
    if (in.p_loc != nullptr) {
      for (int64_t j = 0; j < len; ++j) copy_[size_t(len + j)] = in.p_loc[j % in.L];
      in.p_loc_periodic = copy_.data() + len;
    }
  }

 private:
  std::vector<T> copy_;
};

// kl: (N,) when reduce (summed over L), else (N, L).
template <typename T>
void family_kl_forward(int family, const FamilyKLIn<T>& in, bool reduce, T* kl, int n_threads);

// grad_kl: (N,) when reduce, else (N, L). Every gradient is (N, L), the
// prior's too; dq_loc, dp_loc null for the exponential, dp_* null when the
// prior's gradients are not wanted.
template <typename T>
void family_kl_backward(int family, const T* grad_kl, const FamilyKLIn<T>& in, bool reduce, T* dq_loc,
                        T* dq_log_param, T* dp_loc, T* dp_log_param, int n_threads);

// The pieces a sampler runs inside its own loops, so that the KL reads q
// while the sampler's tile or block is in cache (sample_family.cpp's hooks):
// kl[r0 .. r1) summed over L; and the gradients of elements e0 .. e0 + n - 1
// (n <= 512) from grad_kl (N,), q's added to what dq_loc, dq_log_param hold
// (the sampler's), p's written where dp_* are not null; q's log-params from
// in.q_log_param_block where it is set.
template <typename T>
void family_kl_forward_rows(int family, const FamilyKLIn<T>& in, int64_t r0, int64_t r1, T* kl);

template <typename T>
void family_kl_add_backward(int family, const T* grad_kl, const FamilyKLIn<T>& in, int64_t e0, int64_t n,
                            T* dq_loc, T* dq_log_param, T* dp_loc, T* dp_log_param);

}  // namespace fastvae
