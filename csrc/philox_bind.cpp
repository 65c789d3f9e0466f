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

  m.def("philox_words", [](uint64_t seed, uint64_t counter0, py::array out) {
    if (out.ndim() != 2 || out.shape(1) != 4) {
      throw py::value_error("out: expected a 2-d (n, 4) array, got " + shape_str(out));
    }
    const int64_t n = out.shape(0);
    // counters, not offsets: the last offset, 4 (counter0 + n) - 1, must fit in int64
    if (n > 0 && (counter0 > uint64_t(INT64_MAX) / 4 || uint64_t(n - 1) > uint64_t(INT64_MAX) / 4 - counter0)) {
      throw py::value_error("philox_words: the last Philox offset exceeds 2**63 - 1");
    }
    uint32_t* p = checked<uint32_t>(out, "out", {n, 4}, true);
    py::gil_scoped_release r;
    fastvae::philox_words(seed, counter0, n, p);
  }, py::arg("seed"), py::arg("counter0"), py::arg("out"),
     "out[j] = the four Philox4x32-10 words of counter counter0 + j (uint32), drawn by the noise path in "
     "use (noise_isa()): the bit-exactness check of each path.");

  m.def("noise_isa", [] { return std::string(noise_isa_name(noise_isa())); },
        "The vector path the noise is drawn with: 'avx512', 'avx2' or 'portable' (chosen when the module "
        "loads, or forced by set_noise_isa).");
  m.def("noise_isas", [] {
    py::list names;
    for (int i = 0; i <= static_cast<int>(best_noise_isa()); ++i) names.append(noise_isa_name(static_cast<NoiseIsa>(i)));
    return names;
  }, "The noise paths this CPU can run, from 'portable' to the one the loader picks.");
  m.def("set_noise_isa", [](const std::string& name) {
    if (name == "auto") {
      set_noise_isa(best_noise_isa());
      return;
    }
    for (const NoiseIsa isa : {NoiseIsa::kPortable, NoiseIsa::kAvx2, NoiseIsa::kAvx512}) {
      if (name != noise_isa_name(isa)) continue;
      if (!set_noise_isa(isa)) {
        throw py::value_error("set_noise_isa: this CPU cannot run the '" + name + "' path (best: '" +
                              noise_isa_name(best_noise_isa()) + "')");
      }
      return;
    }
    throw py::value_error("set_noise_isa: name must be 'auto', 'portable', 'avx2' or 'avx512', got '" + name + "'");
  }, py::arg("name"),
     "Forces the noise path for every later draw ('auto' restores the loader's choice), so that tests and "
     "benchmarks run the paths this CPU would not pick. Not thread-safe against running kernels.");
}

FASTVAE_BIND(bind_philox);

}  // namespace fastvae::bind
