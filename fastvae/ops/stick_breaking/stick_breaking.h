// stick_breaking's C++ kernels (stick_breaking.cpp), for its binding
// (bind.cpp) and its eager operator (torch_op.cpp). As in csrc/ops.h, the
// callers have checked every extent; these trust them.
#pragma once

#include <cstdint>

namespace fastvae {

// y: (N, M), M >= 1; z: (N, M + 1).
template <typename T>
void stick_breaking_forward(const T* y, int64_t N, int64_t M, T* z, int n_threads);

// grad_z, z: (N, M + 1); y, dy: (N, M).
template <typename T>
void stick_breaking_backward(const T* grad_z, const T* y, const T* z, int64_t N, int64_t M, T* dy,
                             int n_threads);

}  // namespace fastvae
