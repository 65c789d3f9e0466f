// Known-answer test of the C++ kernels without Python: the Philox words, the
// uniforms and the normals of the noise stream, and three kernels, against the
// fixed values of known_answers.h (fastvae's float64 reference). Every noise
// path this CPU runs is checked in turn. Built and run by .ci/cross-arm, on
// x86 natively and for aarch64 under qemu-user: the portable build proven on
// ARM, not assumed. Exits non-zero, naming each mismatch, on any failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "gaussian_log_prob/gaussian_log_prob.h"
#include "kl_normal/kl_normal.h"
#include "known_answers.h"
#include "ops.h"
#include "philox.h"
#include "sample_normal/sample_normal.h"

namespace {

int failures = 0;

void check(bool ok, const char* what, const char* path, long index, double got, double want) {
  if (ok) return;
  ++failures;
  std::printf("MISMATCH [%s] %s[%ld]: got %.17g, want %.17g\n", path, what, index, got, want);
}

// The cross-backend tolerance of the float32 normals (tests/test_philox.py):
// log, sin and cos round differently between libms and FMA contraction.
bool close32(double got, double want) { return std::fabs(got - want) <= 2e-6 * std::fabs(want) + 1e-6; }
bool close64(double got, double want) { return std::fabs(got - want) <= 1e-13 * std::fabs(want) + 1e-13; }
bool close_rel(double got, double want, double rel) { return std::fabs(got - want) <= rel * (1 + std::fabs(want)); }

void check_noise(const char* path) {
  // the words: fixed counters, one at a time and inside a vector group
  for (size_t c = 0; c < sizeof kat::kWordSeeds / sizeof kat::kWordSeeds[0]; ++c) {
    uint32_t words[4];
    fastvae::philox_words(kat::kWordSeeds[c], kat::kWordCounters[c], 1, words);
    for (int w = 0; w < 4; ++w) check(words[w] == kat::kWords[4 * c + w], "word", path, 4 * c + w, words[w], kat::kWords[4 * c + w]);
  }
  std::vector<uint32_t> run(4 * 100);  // counters 1000 ... 1099: whole groups of the vector path and a tail
  fastvae::philox_words(987654321, 1000, 100, run.data());
  for (int j : {0, 37, 99}) {
    const size_t c = j == 0 ? 3 : j == 37 ? 4 : 5;
    for (int w = 0; w < 4; ++w) check(run[4 * j + w] == kat::kWords[4 * c + w], "run word", path, 4 * j + w, run[4 * j + w], kat::kWords[4 * c + w]);
  }
  const fastvae::PhiloxKeys keys(987654321);
  for (int j = 0; j < 100; ++j) {
    const fastvae::Philox4 s = fastvae::philox_4x(keys, 1000 + j);
    const uint32_t scalar[4] = {s.w0, s.w1, s.w2, s.w3};
    for (int w = 0; w < 4; ++w) check(run[4 * j + w] == scalar[w], "run word vs philox_4x", path, 4 * j + w, run[4 * j + w], scalar[w]);
  }

  // the uniforms, bit for bit
  float u1[kat::kUniformN], u2[kat::kUniformN];
  fastvae::uniform_fill(kat::kUniformSeed, kat::kUniformOffset0, kat::kUniformN, u1, u2);
  for (int i = 0; i < kat::kUniformN; ++i) {
    uint32_t b1, b2;
    std::memcpy(&b1, &u1[i], 4);
    std::memcpy(&b2, &u2[i], 4);
    check(b1 == kat::kUniformBits[2 * i], "u1 bits", path, i, b1, kat::kUniformBits[2 * i]);
    check(b2 == kat::kUniformBits[2 * i + 1], "u2 bits", path, i, b2, kat::kUniformBits[2 * i + 1]);
  }

  // the normals (an unaligned head, whole groups of 128 and a tail)
  std::vector<float> n32(kat::kNormalN);
  std::vector<double> n64(kat::kNormalN);
  fastvae::randn_block(kat::kNormalSeed, kat::kNormalOffset0, kat::kNormalN, n32.data());
  fastvae::randn_block(kat::kNormalSeed, kat::kNormalOffset0, kat::kNormalN, n64.data());
  for (size_t j = 0; j < sizeof kat::kNormalAt / sizeof kat::kNormalAt[0]; ++j) {
    const int i = kat::kNormalAt[j];
    check(close32(n32[i], kat::kNormal32[j]), "normal f32", path, i, n32[i], kat::kNormal32[j]);
    check(close64(n64[i], kat::kNormal64[j]), "normal f64", path, i, n64[i], kat::kNormal64[j]);
  }
  for (int i = 0; i < kat::kNormalN; ++i) check(std::isfinite(n32[i]) && std::fabs(n32[i]) < 6, "normal f32 finite", path, i, n32[i], 0);

  // sample_normal's forward (training layout), which draws through randn_block
  constexpr int64_t NL = kat::kSnN * kat::kSnL;
  std::vector<float> mu(NL), lv(NL), z(kat::kSnK * NL), kl(kat::kSnN);
  for (int64_t i = 0; i < NL; ++i) {
    mu[i] = static_cast<float>(0.1 * i - 0.5);
    lv[i] = static_cast<float>(0.2 * i - 1.0);
  }
  fastvae::sample_normal_forward<float>(mu.data(), lv.data(), kat::kSnSeed, 0, NL, kat::kSnL, kat::kSnK, kat::kSnN,
                                        kat::kSnL, z.data(), kl.data(), nullptr, 2);
  for (int64_t i = 0; i < kat::kSnK * NL; ++i) check(close_rel(z[i], kat::kSnZ[i], 1e-5), "sample_normal z", path, i, z[i], kat::kSnZ[i]);
  for (int64_t i = 0; i < kat::kSnN; ++i) check(close_rel(kl[i], kat::kSnKl[i], 1e-5), "sample_normal kl", path, i, kl[i], kat::kSnKl[i]);
}

// Kernels that draw no noise: once.
void check_kernels() {
  constexpr int64_t PD = kat::kGP * kat::kGD;
  std::vector<float> x(PD), m(PD), v(PD), out(kat::kGP);
  for (int64_t i = 0; i < PD; ++i) {
    x[i] = static_cast<float>(0.3 * i - 1.0);
    m[i] = static_cast<float>(0.1 * i - 0.5);
    v[i] = static_cast<float>(0.2 * i - 1.0);
  }
  fastvae::gaussian_log_prob_forward<float, float, float>(x.data(), m.data(), v.data(), fastvae::VarLayout::kElement,
                                                          false, 1e-6, 1, kat::kGP, kat::kGD, out.data(), 1);
  for (int64_t p = 0; p < kat::kGP; ++p) check(close_rel(out[p], kat::kGaussian[p], 1e-5), "gaussian_log_prob", "-", p, out[p], kat::kGaussian[p]);
  // kl_normal against the standard normal prior: the KL sample_normal returns
  std::vector<float> kl(kat::kSnN);
  std::vector<float> mu(kat::kSnN * kat::kSnL), lv(kat::kSnN * kat::kSnL);
  for (size_t i = 0; i < mu.size(); ++i) {
    mu[i] = static_cast<float>(0.1 * i - 0.5);
    lv[i] = static_cast<float>(0.2 * i - 1.0);
  }
  fastvae::kl_normal_forward<float>(mu.data(), lv.data(), nullptr, nullptr, kat::kSnN, kat::kSnL, kl.data(), 1);
  for (int64_t i = 0; i < kat::kSnN; ++i) check(close_rel(kl[i], kat::kSnKl[i], 1e-5), "kl_normal", "-", i, kl[i], kat::kSnKl[i]);
}

}  // namespace

int main() {
  const fastvae::NoiseIsa best = fastvae::best_noise_isa();
  for (int i = 0; i <= static_cast<int>(best); ++i) {
    const auto isa = static_cast<fastvae::NoiseIsa>(i);
    if (!fastvae::set_noise_isa(isa)) {
      std::printf("cannot select the %s noise path\n", fastvae::noise_isa_name(isa));
      return 1;
    }
    check_noise(fastvae::noise_isa_name(isa));
    std::printf("noise path %s: checked\n", fastvae::noise_isa_name(isa));
  }
  check_kernels();
  if (failures) {
    std::printf("known answers: %d MISMATCHES\n", failures);
    return 1;
  }
  std::printf("known answers: all match (best noise path %s)\n", fastvae::noise_isa_name(best));
  return 0;
}
