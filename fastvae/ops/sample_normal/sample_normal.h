// Raw-pointer kernels of sample_normal (sample_normal.cpp), for its binding
// (bind.cpp) and its eager operator (torch_op.cpp). As in csrc/ops.h, the
// callers have checked every extent; these trust them.
#pragma once

#include <cstdint>

namespace fastvae {

// mu, logvar: (N, L); z: (K, N, L); kl: (N,). z[k, n, l] uses the noise at
// offset0 + k * sample_stride + n * row_stride + l (training: 0, N * L, L).
// of_scale: `logvar` holds the scales exp(logvar / 2) instead (a torch Normal's),
// whose logvar 2 log(scale) the kernel takes in its loops. exp_z: z is exp of
// the Gaussian draw (a LogNormal's), with no log_ratio.
template <typename T>
void sample_normal_forward(const T* mu, const T* logvar, uint64_t seed, uint64_t offset0,
                           uint64_t sample_stride, uint64_t row_stride, int64_t K, int64_t N,
                           int64_t L, T* z, T* kl, T* log_ratio, int n_threads, bool of_scale = false,
                           bool exp_z = false);

// dz: (K, N, L); dkl: (N,); dratio (K, N): the gradient of the log-ratio output
// (sample_normal_with_ratio), stop_score its mode; each may be null (no gradient);
// mu, logvar, dmu, dlogvar: (N, L). of_scale: `logvar` holds the scales (as the
// forward's), and `dlogvar` gets the scales' gradient; exp_z: dz is the
// gradient of the forward's exp_z draw.
template <typename T>
void sample_normal_backward(const T* dz, const T* dkl, const T* dratio, const T* mu, const T* logvar,
                            uint64_t seed, bool stop_score, int64_t K, int64_t N, int64_t L, T* dmu,
                            T* dlogvar, int n_threads, bool of_scale = false, bool exp_z = false);

}  // namespace fastvae
