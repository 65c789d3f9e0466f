// Fresh output buffers, shared by the NumPy boundary (buffers.h) and the torch
// operators (torch_ops.cpp): huge-page advice, and the NaN poisoning of the
// tests. No pybind11 or torch here.
#pragma once

#include <cstddef>
#include <atomic>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastvae {

// Large outputs are fresh allocations whose first touch costs a page fault
// per 4 KiB (about half the time of a K = 16 sample_normal); asking for
// transparent huge pages on the 2 MiB-aligned interior before the kernel
// writes cuts that several-fold. Advice only: failure changes nothing.
inline void advise_huge_pages(void* data, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (nbytes < 2 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(data);
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (p + nbytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)nbytes;
#endif
}

// Set by the tests (fastvae._C._set_poison_outputs): the torch operators then
// fill every output with NaN before the kernel runs, so an element a kernel
// leaves unwritten fails a test. The Python front end's outputs are poisoned
// the same way (fastvae._backend.empty_output).
inline std::atomic<bool> poison_outputs{false};

}  // namespace fastvae
