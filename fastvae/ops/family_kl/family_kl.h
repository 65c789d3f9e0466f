// family_kl's C++ kernels (family_kl.cpp), for its binding (bind.cpp). As in
// csrc/ops.h, the callers have checked every extent; these trust them.
#pragma once

#include <cstdint>

namespace fastvae {

// The parameters of one call: q's (N, L); p's (N, L), or (L,) when p_shared.
// q_loc and p_loc are null for the exponential, whose log-rates sit in the
// log_param arrays (the log-scales of the location-scale families); the
// Kumaraswamy's (log a, log b) and its Beta prior's (log alpha, log beta) sit
// in (loc, log_param).
template <typename T>
struct FamilyKLIn {
  const T* q_loc;
  const T* q_log_param;
  const T* p_loc;
  const T* p_log_param;
  bool p_shared;
  int64_t N, L;
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

}  // namespace fastvae
