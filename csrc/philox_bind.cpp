// Python bindings of the raw noise stream, for the bit-exactness tests.
#include "buffers.h"
#include "ops.h"

namespace fastvae::bind {
namespace {

// The last offset must fit in int64, the type of Triton's offsets, so that
// every backend draws the same counters; checked without overflowing.
void check_last_offset(const char* fn, uint64_t offset0, int64_t rows, int64_t cols, int64_t stride) {
  if (rows <= 0 || cols <= 0) return;
  const unsigned __int128 last = static_cast<unsigned __int128>(offset0) +
                                 static_cast<unsigned __int128>(rows - 1) * uint64_t(stride) +
                                 uint64_t(cols - 1);
  if (last > static_cast<unsigned __int128>(INT64_MAX)) {
    throw py::value_error(std::string(fn) + ": the last Philox offset exceeds 2**63 - 1");
  }
}

}  // namespace

void bind_philox(py::module_& m) {
  m.def("randn_fill", [](uint64_t seed, uint64_t offset0, py::array out, py::object row_stride,
                         int n_threads) {
    check_threads(n_threads);
    if (out.ndim() != 1 && out.ndim() != 2) {
      throw py::value_error("out: expected a 1-d (n,) or 2-d (rows, cols) array, got " + shape_str(out));
    }
    if (out.ndim() == 1 && !row_stride.is_none()) {
      throw py::value_error("row_stride applies to a 2-d out only, got a 1-d out");
    }
    const int64_t rows = out.ndim() == 2 ? out.shape(0) : 1;
    const int64_t cols = out.ndim() == 2 ? out.shape(1) : out.shape(0);
    const int64_t stride = row_stride.is_none() ? cols : row_stride.cast<int64_t>();
    if (stride < 0) throw py::value_error("row_stride must be >= 0, got " + std::to_string(stride));
    check_last_offset("randn_fill", offset0, rows, cols, stride);
    const std::vector<int64_t> shape = out.ndim() == 2 ? std::vector<int64_t>{rows, cols}
                                                       : std::vector<int64_t>{cols};
    by_dtype(out,
             [&] { float* p = checked<float>(out, "out", shape, true);
                   py::gil_scoped_release r;
                   fastvae::randn_fill(seed, offset0, rows, cols, uint64_t(stride), p, n_threads); },
             [&] { double* p = checked<double>(out, "out", shape, true);
                   py::gil_scoped_release r;
                   fastvae::randn_fill(seed, offset0, rows, cols, uint64_t(stride), p, n_threads); });
  }, py::arg("seed"), py::arg("offset0"), py::arg("out"), py::arg("row_stride") = py::none(),
     py::arg("n_threads") = 1,
     "out[i] = the standard normal at Philox offset offset0 + i (the noise contract of docs/architecture.md); for a "
     "2-d out, out[r, c] = the normal at offset0 + r * row_stride + c (row_stride defaults to "
     "the row length, i.e. a contiguous run).");

  m.def("uniform_fill", [](uint64_t seed, uint64_t offset0, py::array u1, py::array u2) {
    if (u1.ndim() != 1) throw py::value_error("u1: expected a 1-d array, got " + shape_str(u1));
    const int64_t n = u1.shape(0);
    check_last_offset("uniform_fill", offset0, 1, n, n);
    float* a = checked<float>(u1, "u1", {n}, true);
    float* b = checked<float>(u2, "u2", {n}, true);
    py::gil_scoped_release r;
    fastvae::uniform_fill(seed, offset0, n, a, b);
  }, py::arg("seed"), py::arg("offset0"), py::arg("u1"), py::arg("u2"),
     "The two float32 uniforms behind each normal of randn_fill.");
}

FASTVAE_BIND(bind_philox);

}  // namespace fastvae::bind
