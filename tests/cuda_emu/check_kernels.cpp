// Runs every launcher of csrc/fused/fused_kernels.h on the CPU CUDA emulator (include/emu_cuda.h)
// and checks the results against float64 references computed here from the same rounded inputs.
//
// Each case poisons its outputs (and the layer-norm workspace) with NaN, so an element a kernel
// never writes fails; buffers are exactly as long as the tensor, so under AddressSanitizer any read
// or write past a row fails; under ThreadSanitizer a missing barrier is a data race. Masked softmax
// elements, fully masked rows and the causal upper triangle must be exactly 0, and the causal
// kernels' masked inputs are NaN, so a kernel that lets them leak into a row fails. The shapes are
// chosen to reach every compiled (vector width, chunks per thread) variant and threads-per-row from
// 32 to 1024; the configurations reached are printed (`config ...`) for the test to compare with
// the compiled lists. Exit status 0 iff every case passed.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <new>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "common.cuh"

namespace mf = megatron_fused;
using mf::DType;

template <typename T>
struct Type;
template <>
struct Type<float> {
  static constexpr DType dtype = DType::kFloat32;
  static constexpr const char* name = "fp32";
  static constexpr double rtol = 1e-5;
  static constexpr double atol = 0x1p-149;  // one subnormal ulp: rounding of tiny outputs
};
template <>
struct Type<__half> {
  static constexpr DType dtype = DType::kFloat16;
  static constexpr const char* name = "fp16";
  static constexpr double rtol = 1.0 / 1024;  // one ulp: output rounding is half an ulp
  static constexpr double atol = 0x1p-24;
};
template <>
struct Type<__nv_bfloat16> {
  static constexpr DType dtype = DType::kBFloat16;
  static constexpr const char* name = "bf16";
  static constexpr double rtol = 1.0 / 128;
  static constexpr double atol = 0x1p-133;
};

template <typename T>
double val(T x) {
  return mf::to_float(x);
}
template <typename T>
T make(double x) {
  return mf::from_float<T>(static_cast<float>(x));
}

// A device-buffer stand-in: exactly n elements (so AddressSanitizer flags any access past them),
// 64-byte aligned, or one element past the alignment when `unaligned` (forcing the scalar path).
template <typename T>
class Buf {
 public:
  explicit Buf(size_t n, bool unaligned = false) : n_(n), off_(unaligned ? 1 : 0) {
    raw_ = static_cast<T*>(::operator new((n + off_) * sizeof(T), std::align_val_t(64)));
  }
  ~Buf() { ::operator delete(raw_, std::align_val_t(64)); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  T* data() { return raw_ + off_; }
  T& operator[](size_t i) { return raw_[off_ + i]; }
  void poison() {
    // all-ones bits: NaN in fp32, fp16 and bf16
    std::memset(static_cast<void*>(data()), 0xff, n_ * sizeof(T));
  }

 private:
  size_t n_, off_;
  T* raw_;
};

// Largest |out - ref| / tol over a tensor, plus the first unwritten (NaN) or non-zero-where-zero element.
struct Compare {
  double worst = 0;
  std::string problem, detail;
  void add(double out, double ref, double tol, int64_t i, bool exact_zero = false) {
    if (!problem.empty()) return;
    if (std::isnan(out)) {
      problem = "element " + std::to_string(i) + " not written (NaN)";
    } else if (exact_zero && out != 0.0) {
      problem = "element " + std::to_string(i) + " must be exactly 0, got " + std::to_string(out);
    } else if (!(std::fabs(out - ref) / tol <= worst)) {
      worst = std::fabs(out - ref) / tol;
      char buf[160];
      std::snprintf(buf, sizeof buf, "element %lld: got %.9g, reference %.9g, tolerance %.3g", static_cast<long long>(i),
                    out, ref, tol);
      detail = buf;
    }
  }
};

struct Report {
  int cases = 0, failed = 0;
  std::set<std::string> configs;
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();

  // Emulator failures (undefined behaviour, bad launches) and the launcher's status for one call.
  static std::string launch_problem(cudaError_t err) {
    emu::Failures& f = emu::failures();
    std::lock_guard<std::mutex> lock(f.m);
    std::string why;
    for (const auto& m : f.messages) why += (why.empty() ? "" : "; ") + m;
    f.messages.clear();
    if (why.empty() && err != cudaSuccess) why = std::string("launcher returned ") + cudaGetErrorString(err);
    return why;
  }

  void result(const std::string& name, const std::vector<std::pair<std::string, Compare>>& parts,
              const std::string& launch) {
    ++cases;
    std::string line, bad = launch;
    for (const auto& [what, c] : parts) {
      char buf[96];
      std::snprintf(buf, sizeof buf, " %s=%.3f", what.c_str(), c.worst);
      line += buf;
      if (bad.empty() && !c.problem.empty()) bad = what + ": " + c.problem;
      if (bad.empty() && !(c.worst <= 1.0)) bad = what + ": error above tolerance at " + c.detail;
    }
    if (!bad.empty()) ++failed;
    const auto now = std::chrono::steady_clock::now();
    const double secs = std::chrono::duration<double>(now - last_).count();
    last_ = now;
    std::printf("%s %s err/tol:%s (%.2f s)%s%s\n", bad.empty() ? "ok  " : "FAIL", name.c_str(), line.c_str(), secs,
                bad.empty() ? "" : "  -- ", bad.c_str());
    std::fflush(stdout);
  }

  // Records the (vector width, chunks, threads per row) the launcher picks for a row of n elements.
  void config(const char* kernel, int64_t n, int vec) {
    mf::RowConfig cfg;
    bool ok = false;
    if (vec == 8) ok = mf::choose_row_config(n / 8, mf::ChunkList<8>::values, mf::ChunkList<8>::size, 1024, &cfg);
    if (vec == 4) ok = mf::choose_row_config(n / 4, mf::ChunkList<4>::values, mf::ChunkList<4>::size, 1024, &cfg);
    if (vec == 1) ok = mf::choose_row_config(n, mf::ChunkList<1>::values, mf::ChunkList<1>::size, 1024, &cfg);
    if (ok) {
      configs.insert(std::string(kernel) + " vec=" + std::to_string(vec) + " chunks=" + std::to_string(cfg.chunks) +
                     " tpr=" + std::to_string(cfg.tpr));
    }
  }
};

using Rng = std::mt19937_64;

template <typename T>
std::string shape_name(const char* kernel, std::initializer_list<int64_t> dims, bool unaligned) {
  std::string s = std::string(kernel) + " " + Type<T>::name + " [";
  for (int64_t d : dims) s += std::to_string(d) + ",";
  s.back() = ']';
  return s + (unaligned ? " unaligned" : "");
}

// ---- softmax ------------------------------------------------------------------------------------
enum class MaskKind { kNone, kPerBatch, kBroadcast };

// Reference backward of softmax rows and the kernel's result compared with it.
template <typename T>
Compare softmax_backward_compare(Buf<T>& dy, Buf<T>& y, Buf<T>& dx, int64_t rows, int64_t sk, double scale) {
  Compare c;
  for (int64_t r = 0; r < rows; ++r) {
    double dot = 0, mag_dot = 0;
    for (int64_t j = 0; j < sk; ++j) {
      dot += val(dy[r * sk + j]) * val(y[r * sk + j]);
      mag_dot += std::fabs(val(dy[r * sk + j]) * val(y[r * sk + j]));
    }
    for (int64_t j = 0; j < sk; ++j) {
      const int64_t i = r * sk + j;
      const double p = val(y[i]), g = val(dy[i]);
      const double ref = scale * p * (g - dot);
      const double mag = scale * p * (std::fabs(g) + mag_dot);
      c.add(val(dx[i]), ref, Type<T>::rtol * std::fabs(ref) + 1e-5 * mag + Type<T>::atol, i, p == 0.0);
    }
  }
  return c;
}

// Reference softmax(scale * x) of rows of sk, masked(r, j) elements excluded (exactly 0), against y.
template <typename T, typename Masked>
Compare softmax_forward_compare(Buf<T>& x, Buf<T>& y, int64_t rows, int64_t sk, double scale, Masked masked) {
  Compare c;
  for (int64_t r = 0; r < rows; ++r) {
    double mx = -INFINITY, sum = 0;
    for (int64_t j = 0; j < sk; ++j) {
      if (!masked(r, j)) mx = std::max(mx, scale * val(x[r * sk + j]));
    }
    for (int64_t j = 0; j < sk; ++j) {
      if (!masked(r, j)) sum += std::exp(scale * val(x[r * sk + j]) - mx);
    }
    for (int64_t j = 0; j < sk; ++j) {
      const int64_t i = r * sk + j;
      const double ref = masked(r, j) ? 0.0 : std::exp(scale * val(x[i]) - mx) / sum;
      c.add(val(y[i]), ref, Type<T>::rtol * ref + 1e-6 + Type<T>::atol, i, masked(r, j));
    }
  }
  return c;
}

// After a forward launch (its problem and comparison): runs the backward out of place and in place
// (grad_input aliasing grad_output) on the kernel's y and reports the case.
template <typename T, typename Launch>
void softmax_backward_and_report(Report& rep, Rng& rng, const std::string& name, std::string problem,
                                 const Compare& fwd, Buf<T>& y, int64_t rows, int64_t sk, double scale,
                                 bool unaligned, Launch launch) {
  if (!problem.empty()) return rep.result(name, {}, problem);
  const int64_t n = rows * sk;
  Buf<T> dy(n, unaligned), dx(n, unaligned), inplace(n, unaligned);
  std::uniform_real_distribution<double> u(-2, 2);
  for (int64_t i = 0; i < n; ++i) inplace[i] = dy[i] = make<T>(u(rng));
  dx.poison();
  problem = Report::launch_problem(launch(dy.data(), y.data(), dx.data()));
  if (problem.empty()) problem = Report::launch_problem(launch(inplace.data(), y.data(), inplace.data()));
  rep.result(name,
             {{"y", fwd},
              {"dx", softmax_backward_compare(dy, y, dx, rows, sk, scale)},
              {"dx_inplace", softmax_backward_compare(dy, y, inplace, rows, sk, scale)}},
             problem);
  rep.config("softmax", sk, !unaligned && sk % 8 == 0 ? 8 : 1);
}

template <typename T>
void softmax_masked_case(Report& rep, Rng& rng, int64_t b, int64_t np, int64_t sq, int64_t sk, MaskKind kind,
                         double scale, bool unaligned = false) {
  const int64_t rows = b * np * sq, n = rows * sk;
  const int64_t mask_batches = kind == MaskKind::kPerBatch ? b : 1;
  Buf<T> x(n, unaligned), y(n, unaligned);
  Buf<uint8_t> mask(kind == MaskKind::kNone ? 1 : mask_batches * sq * sk);
  std::uniform_real_distribution<double> u(-8, 8);
  std::bernoulli_distribution masked(0.3);
  for (int64_t i = 0; i < n; ++i) x[i] = make<T>(u(rng));
  for (int64_t mb = 0; kind != MaskKind::kNone && mb < mask_batches; ++mb) {
    for (int64_t q = 0; q < sq; ++q) {
      for (int64_t j = 0; j < sk; ++j) {  // row 0 unmasked, the last row (sq > 1) fully masked
        mask[(mb * sq + q) * sk + j] = q == 0 ? 0 : (q == sq - 1 ? 1 : masked(rng));
      }
    }
  }
  y.poison();
  const uint8_t* m = kind == MaskKind::kNone ? nullptr : mask.data();
  std::string problem = Report::launch_problem(mf::scaled_masked_softmax_forward(
      Type<T>::dtype, x.data(), m, y.data(), b, np, sq, sk, kind == MaskKind::kBroadcast, static_cast<float>(scale),
      nullptr));

  const Compare fwd = softmax_forward_compare(x, y, rows, sk, scale, [&](int64_t r, int64_t j) {
    const int64_t batch = kind == MaskKind::kPerBatch ? r / (np * sq) : 0;
    return m != nullptr && mask[(batch * sq + r % sq) * sk + j] != 0;
  });
  const char* mask_name = kind == MaskKind::kNone ? "" : (kind == MaskKind::kPerBatch ? " mask" : " mask[1]");
  const std::string name = shape_name<T>("masked_softmax", {b, np, sq, sk}, unaligned) + mask_name;
  softmax_backward_and_report<T>(rep, rng, name, problem, fwd, y, rows, sk, scale, unaligned, [&](T* dy, T* p, T* dx) {
    return mf::scaled_masked_softmax_backward(Type<T>::dtype, dy, p, dx, rows, sk, static_cast<float>(scale), nullptr);
  });
}

template <typename T>
void softmax_causal_case(Report& rep, Rng& rng, int64_t batches, int64_t sq, int64_t sk, double scale,
                         bool unaligned = false) {
  const int64_t rows = batches * sq, n = rows * sk;
  Buf<T> x(n, unaligned), y(n, unaligned);
  std::uniform_real_distribution<double> u(-8, 8);
  auto valid = [&](int64_t r) { return std::clamp<int64_t>(r % sq + (sk - sq) + 1, 0, sk); };
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < sk; ++j) x[r * sk + j] = j < valid(r) ? make<T>(u(rng)) : make<T>(NAN);
  }
  y.poison();
  std::string problem = Report::launch_problem(mf::scaled_upper_triang_masked_softmax_forward(
      Type<T>::dtype, x.data(), y.data(), batches, sq, sk, static_cast<float>(scale), nullptr));
  const Compare fwd =
      softmax_forward_compare(x, y, rows, sk, scale, [&](int64_t r, int64_t j) { return j >= valid(r); });
  const std::string name = shape_name<T>("causal_softmax", {batches, sq, sk}, unaligned);
  softmax_backward_and_report<T>(rep, rng, name, problem, fwd, y, rows, sk, scale, unaligned, [&](T* dy, T* p, T* dx) {
    return mf::scaled_upper_triang_masked_softmax_backward(Type<T>::dtype, dy, p, dx, batches, sq, sk,
                                                          static_cast<float>(scale), nullptr);
  });
}

// ---- layer norm ---------------------------------------------------------------------------------
template <typename TI, typename TW>
void layer_norm_case(Report& rep, Rng& rng, int64_t rows, int64_t hidden, bool zero_centered,
                     bool unaligned = false) {
  const int64_t n = rows * hidden;
  const double eps = 1e-5, shift = zero_centered ? 1.0 : 0.0;
  Buf<TI> x(n, unaligned), y(n, unaligned), dy(n, unaligned), dx(n, unaligned);
  Buf<TW> w(hidden, unaligned), bias(hidden, unaligned), dw(hidden, unaligned), db(hidden, unaligned);
  Buf<float> mean(rows), rstd(rows);
  std::normal_distribution<double> nx(3.0, 2.0), nw(zero_centered ? 0.0 : 1.0, 0.5), n01(0.0, 1.0);
  for (int64_t i = 0; i < n; ++i) x[i] = make<TI>(nx(rng));
  for (int64_t i = 0; i < n; ++i) dy[i] = make<TI>(n01(rng));
  for (int64_t j = 0; j < hidden; ++j) w[j] = make<TW>(nw(rng));
  for (int64_t j = 0; j < hidden; ++j) bias[j] = make<TW>(0.5 * n01(rng));
  y.poison();
  dx.poison();
  dw.poison();
  db.poison();
  mean.poison();
  rstd.poison();
  const DType ti = Type<TI>::dtype, tw = Type<TW>::dtype;
  std::string problem = Report::launch_problem(mf::layer_norm_forward(
      ti, tw, x.data(), w.data(), bias.data(), y.data(), mean.data(), rstd.data(), rows, hidden,
      static_cast<float>(eps), zero_centered, nullptr));
  const int64_t partials =
      mf::layer_norm_backward_partials(ti, tw, dy.data(), x.data(), w.data(), dx.data(), rows, hidden);
  Buf<float> workspace(static_cast<size_t>(std::max<int64_t>(2 * partials * hidden, 1)));
  workspace.poison();
  if (problem.empty() && partials < 1) problem = "layer_norm_backward_partials returned " + std::to_string(partials);
  if (problem.empty()) {
    problem = Report::launch_problem(mf::layer_norm_backward(ti, tw, dy.data(), x.data(), mean.data(), rstd.data(),
                                                             w.data(), dx.data(), dw.data(), db.data(),
                                                             workspace.data(), rows, hidden, zero_centered, nullptr));
  }

  Compare cy, cmean, crstd, cdx, cdw, cdb;
  std::vector<double> ref_dw(hidden, 0.0), ref_db(hidden, 0.0), mag_dw(hidden, 0.0), mag_db(hidden, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * hidden;
    double mu = 0, var = 0;
    for (int64_t j = 0; j < hidden; ++j) mu += val(x[o + j]);
    mu /= hidden;
    for (int64_t j = 0; j < hidden; ++j) var += (val(x[o + j]) - mu) * (val(x[o + j]) - mu);
    var /= hidden;
    const double rs = 1.0 / std::sqrt(var + eps);
    cmean.add(mean[r], mu, 1e-5 * (std::fabs(mu) + std::sqrt(var)), r);
    crstd.add(rstd[r], rs, 1e-5 * rs, r);
    double s1 = 0, s2 = 0, m1 = 0, m2 = 0;
    for (int64_t j = 0; j < hidden; ++j) {
      const double xh = (val(x[o + j]) - mu) * rs, g = val(dy[o + j]) * (val(w[j]) + shift);
      const double ref = xh * (val(w[j]) + shift) + val(bias[j]);
      // fp32 statistics err by ~1e-7 of the row's spread: an absolute error in xhat units
      const double mag = (std::fabs(xh) + 1.0) * std::fabs(val(w[j]) + shift) + std::fabs(val(bias[j]));
      cy.add(val(y[o + j]), ref, Type<TI>::rtol * std::fabs(ref) + 1e-5 * mag + Type<TI>::atol, o + j);
      s1 += g;
      s2 += g * xh;
      m1 += std::fabs(g);
      m2 += std::fabs(g * xh);
      ref_dw[j] += val(dy[o + j]) * xh;
      mag_dw[j] += std::fabs(val(dy[o + j])) * (std::fabs(xh) + 1.0);  // xhat's error, as for y
      ref_db[j] += val(dy[o + j]);
      mag_db[j] += std::fabs(val(dy[o + j]));
    }
    s1 /= hidden, s2 /= hidden, m1 /= hidden, m2 /= hidden;
    for (int64_t j = 0; j < hidden; ++j) {
      const double xh = (val(x[o + j]) - mu) * rs, g = val(dy[o + j]) * (val(w[j]) + shift);
      const double ref = rs * (g - s1 - xh * s2);
      const double mag = rs * (std::fabs(g) + m1 + std::fabs(xh) * m2);
      cdx.add(val(dx[o + j]), ref, Type<TI>::rtol * std::fabs(ref) + 1e-5 * mag + Type<TI>::atol, o + j);
    }
  }
  for (int64_t j = 0; j < hidden; ++j) {
    cdw.add(val(dw[j]), ref_dw[j], Type<TW>::rtol * std::fabs(ref_dw[j]) + 1e-5 * mag_dw[j] + Type<TW>::atol, j);
    cdb.add(val(db[j]), ref_db[j], Type<TW>::rtol * std::fabs(ref_db[j]) + 1e-5 * mag_db[j] + Type<TW>::atol, j);
  }
  std::string name = shape_name<TI>("layer_norm", {rows, hidden}, unaligned) + " weight " + Type<TW>::name +
                     (zero_centered ? " zero_centered" : "");
  rep.result(name, {{"y", cy}, {"mean", cmean}, {"rstd", crstd}, {"dx", cdx}, {"dw", cdw}, {"db", cdb}}, problem);
  const int vec = 16 / static_cast<int>(sizeof(TI));
  rep.config("layer_norm", hidden, !unaligned && hidden % vec == 0 ? vec : 1);
}

// ---- unsupported sizes: the launchers refuse them before any launch, memory untouched ----------
void unsupported_cases(Report& rep) {
  Buf<__half> x(16385), y(16385);
  Buf<float> f(16385), stats(2);
  y.poison();
  const DType h = DType::kFloat16;
  struct Refusal {
    const char* what;
    cudaError_t err;
  };
  const Refusal refusals[] = {
      {"softmax sk=16385", mf::scaled_masked_softmax_forward(h, x.data(), nullptr, y.data(), 1, 1, 1, 16385, false,
                                                             1.f, nullptr)},
      {"softmax sk=0", mf::scaled_masked_softmax_forward(h, x.data(), nullptr, y.data(), 1, 1, 1, 0, false, 1.f,
                                                         nullptr)},
      {"softmax fp32", mf::scaled_masked_softmax_forward(DType::kFloat32, f.data(), nullptr, f.data(), 1, 1, 1, 8,
                                                         false, 1.f, nullptr)},
      {"causal sk=16385", mf::scaled_upper_triang_masked_softmax_forward(h, x.data(), y.data(), 1, 1, 16385, 1.f,
                                                                         nullptr)},
      {"layer_norm hidden=16385", mf::layer_norm_forward(h, h, x.data(), x.data(), x.data(), y.data(), stats.data(),
                                                         stats.data() + 1, 1, 16385, 1e-5f, false, nullptr)},
      {"layer_norm fp16 input, bf16 weight",
       mf::layer_norm_forward(h, DType::kBFloat16, x.data(), x.data(), x.data(), y.data(), stats.data(),
                              stats.data() + 1, 1, 8, 1e-5f, false, nullptr)},
  };
  for (const Refusal& r : refusals) {
    Compare untouched;
    for (int64_t i = 0; i < 16385; ++i) untouched.add(std::isnan(val(y[i])) ? 0.0 : 1.0, 0.0, 1.0, i);
    const std::string launch = Report::launch_problem(cudaSuccess);
    rep.result(std::string("refuses ") + r.what, {{"untouched", untouched}},
               r.err == cudaErrorInvalidValue ? launch : "expected cudaErrorInvalidValue" + launch);
  }
  const int64_t parts = mf::layer_norm_backward_partials(h, h, x.data(), x.data(), x.data(), y.data(), 1, 16385);
  rep.result("refuses layer_norm backward hidden=16385", {},
             parts == -1 ? "" : "partials = " + std::to_string(parts) + ", expected -1");
}

template <typename T>
void softmax_suite(Report& rep, Rng& rng) {
  // 16-byte vectors (sk % 8 == 0): chunks {1, 2}, threads per row 32..1024
  softmax_masked_case<T>(rep, rng, 2, 2, 3, 8, MaskKind::kPerBatch, 1.0);
  softmax_masked_case<T>(rep, rng, 1, 3, 5, 264, MaskKind::kBroadcast, 0.5);  // 2 rows a block, last half empty
  softmax_masked_case<T>(rep, rng, 1, 2, 3, 1000, MaskKind::kBroadcast, 1.0);
  softmax_masked_case<T>(rep, rng, 2, 1, 2, 2048, MaskKind::kNone, 0.125);
  softmax_masked_case<T>(rep, rng, 1, 1, 3, 4096, MaskKind::kPerBatch, 1.0);
  softmax_masked_case<T>(rep, rng, 1, 1, 2, 8192, MaskKind::kBroadcast, 1.0);
  softmax_masked_case<T>(rep, rng, 2, 1, 2, 16384, MaskKind::kPerBatch, 0.25);
  // scalar path (sk % 8 != 0 or unaligned): chunks {1, 4, 16}
  softmax_masked_case<T>(rep, rng, 1, 2, 3, 1, MaskKind::kNone, 1.0);
  softmax_masked_case<T>(rep, rng, 2, 1, 3, 37, MaskKind::kPerBatch, 2.0);
  softmax_masked_case<T>(rep, rng, 1, 1, 3, 999, MaskKind::kBroadcast, 1.0);
  softmax_masked_case<T>(rep, rng, 1, 1, 2, 5001, MaskKind::kNone, 1.0);
  softmax_masked_case<T>(rep, rng, 1, 1, 2, 16383, MaskKind::kPerBatch, 1.0);
  softmax_masked_case<T>(rep, rng, 1, 2, 2, 256, MaskKind::kPerBatch, 1.0, true);
  softmax_masked_case<T>(rep, rng, 1, 1, 2, 4096, MaskKind::kNone, 1.0, true);
  // causal, sq == sk and sq != sk (rows with no valid column when sq > sk)
  softmax_causal_case<T>(rep, rng, 3, 8, 8, 1.0);
  softmax_causal_case<T>(rep, rng, 2, 37, 37, 0.5);
  softmax_causal_case<T>(rep, rng, 2, 64, 64, 1.0);
  softmax_causal_case<T>(rep, rng, 1, 16, 2048, 1.0);
  softmax_causal_case<T>(rep, rng, 1, 12, 4, 1.0);
  softmax_causal_case<T>(rep, rng, 1, 2, 16384, 1.0);
  softmax_causal_case<T>(rep, rng, 1, 64, 64, 1.0, true);
}

template <typename TI, typename TW>
void layer_norm_suite(Report& rep, Rng& rng) {
  constexpr bool wide = sizeof(TI) == 4;  // fp32 rows: 4-element vectors, chunks {1, 2, 4}
  const int64_t vec_hidden[] = {wide ? 4 : 8, 64, 200, 264, 1024, 2048, 4096, 8192, 12288, 16384};
  for (int64_t h : vec_hidden) layer_norm_case<TI, TW>(rep, rng, h <= 1024 ? 21 : 3, h, h == 264 || h == 8192);
  const int64_t scalar_hidden[] = {1, 31, 999, 5001, 16383};
  for (int64_t h : scalar_hidden) layer_norm_case<TI, TW>(rep, rng, h < 1000 ? 9 : 3, h, h == 31);
  layer_norm_case<TI, TW>(rep, rng, 5, 1024, false, true);
}

// Small shapes reaching each shared-memory pattern once (row reductions over 1, 2 and 8 warps, several
// rows per block, the grid-stride backward, the column reduction): for ThreadSanitizer builds, where
// every CUDA thread is an OS thread and the full sweep would take minutes.
void race_suite(Report& rep, Rng& rng) {
  softmax_masked_case<__half>(rep, rng, 2, 1, 5, 8, MaskKind::kPerBatch, 1.0);
  softmax_masked_case<__nv_bfloat16>(rep, rng, 1, 1, 3, 264, MaskKind::kBroadcast, 1.0);
  softmax_causal_case<__half>(rep, rng, 1, 4, 2048, 1.0);
  layer_norm_case<__half, float>(rep, rng, 9, 64, false);
  layer_norm_case<float, float>(rep, rng, 6, 200, true);
  layer_norm_case<__nv_bfloat16, __nv_bfloat16>(rep, rng, 5, 2048, false);
}

int main(int argc, char** argv) {
  // optional filter: softmax | layer_norm | unsupported | race (the small ThreadSanitizer set)
  const std::string only = argc > 1 ? argv[1] : "";
  Report rep;
  Rng rng(1234);
  if (only == "race") race_suite(rep, rng);
  if (only.empty() || only == "softmax") {
    softmax_suite<__half>(rep, rng);
    softmax_suite<__nv_bfloat16>(rep, rng);
  }
  if (only.empty() || only == "layer_norm") {
    layer_norm_suite<float, float>(rep, rng);
    layer_norm_suite<__half, float>(rep, rng);
    layer_norm_suite<__half, __half>(rep, rng);
    layer_norm_suite<__nv_bfloat16, float>(rep, rng);
    layer_norm_suite<__nv_bfloat16, __nv_bfloat16>(rep, rng);
  }
  if (only.empty() || only == "unsupported") unsupported_cases(rep);
  for (const auto& c : rep.configs) std::printf("config %s\n", c.c_str());
  std::printf("SUMMARY cases=%d failed=%d\n", rep.cases, rep.failed);
  return rep.failed == 0 ? 0 : 1;
}
