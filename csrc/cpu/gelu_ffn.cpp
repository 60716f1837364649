// The GELU feed-forward on the CPU: linear_gelu (x @ W^T + b, GELU) and gelu_ffn (x @ W1^T + b1,
// GELU, @ W2^T + b2), forward and backward.
//
// Forward of gelu_ffn, by row blocks of BM rows chosen so that the block's hidden activation
// (BM x F) stays in cache: GEMM (oneDNN for fp32, see matmul()) of the block into a scratch block, then one
// vectorized pass (at::vec) that adds b1, optionally stores the pre-activation for the backward and
// applies the GELU in place, then the second GEMM (+ b2) of the block straight into the output: the
// hidden block is reused while it is in cache, where eager makes three passes over an (M, F) tensor.
// Measured (2 cores, AMD EPYC): nearly all of the gain over eager comes from oneDNN's GEMMs; with
// BLAS GEMMs (FASTLM_CPU_ONEDNN=0) the fused op is at parity with eager (0.93-1.02x). oneDNN's op
// returns a new tensor: with one block (M <= BM) it is the output itself; with several, each block's
// result is copied into the output (one pass, small next to the GEMM).
// linear_gelu: one GEMM into the output, then the same bias+GELU pass in place.
//
// Backward (dpre = dact * gelu'(pre)): by row blocks, dact = dy @ W2 into the dpre buffer, then one
// pass turns it into dpre in place, writes gelu(pre) (the activation dW2 needs) and accumulates db1;
// dx for the block is a GEMM while dpre is in cache. Weight gradients are single large GEMMs
// (dW2 = dy^T @ act, dW1 = dpre^T @ x) after the loop: per-block GEMMs with a short inner dimension
// would re-read the full weight gradient for every block. Bias gradients: each of a fixed number of
// row chunks accumulates its own fp32 row, summed at the end, so results do not depend on scheduling.
//
// Elementwise math is fp32 (fp16/bf16 rows converted in L1-resident scratch rows); the formulas are
// fastlm_math.h's (the scalar tails call them; the vector bodies are the same formulas on at::vec).
#include <ATen/Dispatch.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdlib>
#include <string_view>
#include <vector>

#include "common.h"
#include "cpu/gelu_fast.h"
#include "cpu/isa.h"
#include "cpu/vec_utils.h"
#include "gelu_ffn_checks.h"
#include "fastlm_math.h"

namespace fastlm::cpu {
namespace {

constexpr const char* kLgFwd = "linear_gelu_fwd";
constexpr const char* kLgBwd = "linear_gelu_bwd";
constexpr const char* kFfnFwd = "gelu_ffn_fwd";
constexpr const char* kFfnBwd = "gelu_ffn_bwd";

// Why oneDNN for fp32: on this project's CI machine (AMD EPYC, 2 cores) MKL's sgemm (what at::mm and
// F.linear use for fp32) reaches ~54-67 GFLOP/s at 2048 x 768 x 3072, oneDNN's matmul ~130-150
// GFLOP/s; with both held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2) 67
// against 53 (one noisy run). oneDNN is reached only through torch's public dispatcher op
// mkldnn::_linear_pointwise (y = x @ w^T + b; what torch.compile's CPU lowering calls, and
// fastlm.ops.linear's dense_linear), for fp32 only (its bf16/fp16 paths need AVX-512 BF16/FP16
// hardware). Without it (a torch without oneDNN, another signature) or with FASTLM_CPU_ONEDNN=0:
// BLAS (at::mm / at::addmm).
using LinearPointwiseFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                     c10::string_view, c10::List<std::optional<at::Scalar>>,
                                     std::optional<c10::string_view>);

const c10::TypedOperatorHandle<LinearPointwiseFn>* onednn_linear() {
  static const std::optional<c10::TypedOperatorHandle<LinearPointwiseFn>> op =
      []() -> std::optional<c10::TypedOperatorHandle<LinearPointwiseFn>> {
    const char* e = std::getenv("FASTLM_CPU_ONEDNN");
    if ((e != nullptr && e[0] == '0') || !at::hasMKLDNN()) return std::nullopt;
    auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!handle.has_value() || !handle->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return std::nullopt;
    try {
      return handle->typed<LinearPointwiseFn>();
    } catch (const c10::Error&) {  // another C++ signature in this torch: BLAS
      return std::nullopt;
    }
  }();
  return op.has_value() ? &*op : nullptr;
}

// a @ b (+ bias over the columns) as a new row-major (M, N) tensor; a (M, K), b (K, N) strided.
at::Tensor matmul(const at::Tensor& a, const at::Tensor& b, const at::Tensor* bias = nullptr) {
  const int64_t M = a.size(0), N = b.size(1);
  if (M == 0 || N == 0 || a.size(1) == 0) {
    auto c = at::empty({M, N}, a.options());
    if (bias) c.copy_(bias->expand({M, N})); else c.zero_();
    return c;
  }
  if (a.scalar_type() == at::kFloat) {
    if (const auto* op = onednn_linear()) {
      // oneDNN's weight: (N, K) row-major or its transpose; anything else is copied first
      const at::Tensor w = b.t();
      return op->call(a, w.is_contiguous() || b.is_contiguous() ? w : w.contiguous(),
                      bias ? std::optional<at::Tensor>(*bias) : std::nullopt, "none",
                      c10::List<std::optional<at::Scalar>>(), "");
    }
  }
  return bias ? at::addmm(*bias, a, b) : at::mm(a, b);
}

// c <- a @ b (+ bias), c preallocated (a block of a bigger buffer): BLAS writes it in place, oneDNN's
// op returns a new tensor that is copied (one pass over c, small next to the GEMM).
void matmul_into(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const at::Tensor* bias = nullptr) {
  if (c.numel() == 0) return;
  if (a.scalar_type() == at::kFloat && onednn_linear() != nullptr && a.size(1) > 0) {
    c.copy_(matmul(a, b, bias));
    return;
  }
  auto out = c;
  if (a.size(1) == 0) {
    if (bias) out.copy_(bias->expand(c.sizes())); else out.zero_();
  } else if (bias) {
    at::addmm_out(out, *bias, a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

// Whether the GEMMs of x's dtype run on oneDNN.
bool uses_onednn(const at::Tensor& x) { return x.scalar_type() == at::kFloat && onednn_linear() != nullptr; }

// The gradient a @ b of weight w, in w's layout (row- or column-major, as new_weight_grad):
// column-major as (b^T @ a^T)^T.
at::Tensor weight_grad(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b) {
  if (w.is_contiguous()) return matmul(a, b);
  return matmul(b.t(), a.t()).t();
}

}  // namespace

// Which GEMM the fp32 gelu_ffn / linear_gelu use (for cpu_isa_paths): "onednn" or "blas".
const char* gelu_ffn_gemm_backend() { return onednn_linear() != nullptr ? "onednn" : "blas"; }

namespace {

// Row block of the fused forward: the block's fp32 hidden activation (BM x F) within ~2M floats
// (8 MB: the L3 share of this machine's two cores), 256..1024 rows. Measured at 2048 x 768 -> 3072
// (tanh): 64-row blocks lose GEMM efficiency (1.6x eager instead of 2.0x); from 256 rows up the
// time is flat within noise, so the block is kept as small as that allows.
int64_t block_rows(int64_t F) {
  const int64_t bm = (int64_t{1} << 21) / std::max<int64_t>(F, 1);
  return std::max<int64_t>(256, std::min<int64_t>(1024, bm / 16 * 16));
}

// ---- vectorized GELU (the formulas of fastlm_math.h on at::vec) ----

// AVX2 builds (fVec is 8 lanes): gelu_fast.h's exp-based forms (Sleef's tanh / exp through at::vec
// cost 3-8x more per element here).
inline fVec gelu_vec(fVec x, bool tanh_approx) {
#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__) && defined(__FMA__)
  return fVec(tanh_approx ? fastlm::cpu::gelu_tanh256(x) : fastlm::cpu::gelu_erf256(x));
#else
  const fVec half(0.5f), one(1.f);
  if (tanh_approx) {
    const fVec u = fVec(kGeluSqrt2OverPi) * at::vec::fmadd(fVec(kGeluCoeff) * x * x, x, x);
    return half * x * (one + u.tanh());
  }
  return half * x * (one + (x * fVec(kGeluSqrt1_2)).erf());
#endif
}

// gelu(x) and gelu'(x) together (one tanh or one erf + exp).
inline void gelu_and_grad_vec(fVec x, bool tanh_approx, fVec& g, fVec& dg) {
  const fVec half(0.5f), one(1.f);
  if (tanh_approx) {
    const fVec x2 = x * x;
    const fVec u = fVec(kGeluSqrt2OverPi) * at::vec::fmadd(fVec(kGeluCoeff) * x2, x, x);
#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__) && defined(__FMA__)
    // tanh(u) = 2 / (1 + exp(-2u)) - 1 (absolute error ~1e-7; t enters as 1 + t and 1 - t^2)
    const fVec t = fVec(2.f) / (one + fVec(fastlm::cpu::exp256_capped(fVec(-2.f) * u))) - one;
#else
    const fVec t = u.tanh();
#endif
    const fVec hx = half * x;
    g = hx * (one + t);
    // 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 c x^2)
    const fVec du = fVec(kGeluSqrt2OverPi) * at::vec::fmadd(fVec(3.f * kGeluCoeff), x2, one);
    dg = at::vec::fmadd(hx * (one - t * t), du, half * (one + t));
  } else {
#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__) && defined(__FMA__)
    const fVec cdf = half * (one + fVec(fastlm::cpu::erf256(x * fVec(kGeluSqrt1_2))));
    g = x * cdf;
    dg = at::vec::fmadd(x * fVec(kGeluInvSqrt2Pi), fVec(fastlm::cpu::exp256(fVec(-0.5f) * x * x)), cdf);
#else
    const fVec cdf = half * (one + (x * fVec(kGeluSqrt1_2)).erf());
    g = x * cdf;
    dg = at::vec::fmadd(x * fVec(kGeluInvSqrt2Pi), (fVec(-0.5f) * x * x).exp(), cdf);
#endif
  }
}

// One row, fp32, in place: v <- gelu(v + bias); pre (if not null) <- v + bias. bias may be null.
inline void bias_gelu_row(float* v, const float* bias, float* pre, int64_t n, bool tanh_approx) {
  const int64_t V = fVec::size();
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    fVec h = fVec::loadu(v + i);
    if (bias) h += fVec::loadu(bias + i);
    if (pre) h.store(pre + i);
    gelu_vec(h, tanh_approx).store(v + i);
  }
  for (; i < n; ++i) {
    const float h = v[i] + (bias ? bias[i] : 0.f);
    if (pre) pre[i] = h;
    v[i] = gelu(h, tanh_approx);
  }
}

// One row, fp32: d <- d * gelu'(p) in place; act (if not null) <- gelu(p); db (if not null) += d.
inline void dgelu_row(float* d, const float* p, float* act, float* db, int64_t n, bool tanh_approx) {
  const int64_t V = fVec::size();
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    fVec g, dg;
    gelu_and_grad_vec(fVec::loadu(p + i), tanh_approx, g, dg);
    const fVec dv = fVec::loadu(d + i) * dg;
    dv.store(d + i);
    if (act) g.store(act + i);
    if (db) (fVec::loadu(db + i) + dv).store(db + i);
  }
  for (; i < n; ++i) {
    const float dv = d[i] * gelu_grad(p[i], tanh_approx);
    d[i] = dv;
    if (act) act[i] = gelu(p[i], tanh_approx);
    if (db) db[i] += dv;
  }
}

std::vector<float> float_vector(const at::Tensor* p, int64_t n) {
  std::vector<float> out(p ? n : 0);
  if (p) {
    FASTLM_DISPATCH_FLOAT_TYPES(p->scalar_type(), "float_vector", [&] {
      row_to_float(p->data_ptr<scalar_t>(), out.data(), n);
    });
  }
  return out;
}

// Rows [0, m) of h (m x n, row stride ldh) in place: h <- gelu(h + bias), pre rows (ldp) <- h + bias
// when pre is not null. Parallel over rows.
template <typename T>
void bias_gelu_rows(T* h, int64_t ldh, const float* bias, T* pre, int64_t ldp, int64_t m, int64_t n,
                    bool tanh_approx) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : 2 * n);
    for (int64_t r = begin; r < end; ++r) {
      if constexpr (std::is_same_v<T, float>) {
        bias_gelu_row(h + r * ldh, bias, pre ? pre + r * ldp : nullptr, n, tanh_approx);
      } else {
        float* v = buf.data();
        float* pf = buf.data() + n;
        row_to_float(h + r * ldh, v, n);
        bias_gelu_row(v, bias, pre ? pf : nullptr, n, tanh_approx);
        if (pre) row_from_float(pf, pre + r * ldp, n);
        row_from_float(v, h + r * ldh, n);
      }
    }
  });
}

// Rows [0, m): d (ldd) <- d * gelu'(p (ldp)) in place; act rows (lda) <- gelu(p) when act is not null;
// db_part (chunks x n, fp32) row c += the sum of d over chunk c's rows when db_part is not null.
template <typename T>
void dgelu_rows(T* d, int64_t ldd, const T* p, int64_t ldp, T* act, int64_t lda, float* db_part, int64_t chunks,
                int64_t m, int64_t n, bool tanh_approx) {
  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : 3 * n);
    for (int64_t c = cbegin; c < cend; ++c) {
      float* db = db_part ? db_part + c * n : nullptr;
      for (int64_t r = c * m / chunks; r < (c + 1) * m / chunks; ++r) {
        if constexpr (std::is_same_v<T, float>) {
          dgelu_row(d + r * ldd, p + r * ldp, act ? act + r * lda : nullptr, db, n, tanh_approx);
        } else {
          float* df = buf.data();
          float* pf = df + n;
          float* af = pf + n;
          row_to_float(d + r * ldd, df, n);
          row_to_float(p + r * ldp, pf, n);
          dgelu_row(df, pf, act ? af : nullptr, db, n, tanh_approx);
          row_from_float(df, d + r * ldd, n);
          if (act) row_from_float(af, act + r * lda, n);
        }
      }
    }
  });
}

int64_t num_chunks(int64_t m) { return std::max<int64_t>(1, std::min<int64_t>(m, at::get_num_threads())); }

// ---- linear_gelu ----

std::tuple<at::Tensor, at::Tensor> linear_gelu_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       c10::string_view approximate, bool save_pre) {
  const bool tanh_approx = parse_approximate(approximate, kLgFwd);
  check_rows(x, kLgFwd, "x");
  FASTLM_CHECK(x.device().is_cpu(), kLgFwd, "x must be a CPU tensor, got ", x.device());
  const int64_t M = x.size(0), K = x.size(1);
  FASTLM_CHECK(weight.dim() == 2, kLgFwd, "weight must be 2-D, got ", weight.sizes());
  const int64_t N = weight.size(0);
  check_weight(weight, N, K, x, kLgFwd, "weight");
  check_vector(bias, N, x, kLgFwd, "bias");
  auto pre = new_output({save_pre ? M : 0, N}, x.options());
  if (M == 0) return {new_output({M, N}, x.options()), pre};
  auto out = matmul(x, weight.t());  // row-major (M, N)
  const auto b = float_vector(opt_ptr(bias), N);
  FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kLgFwd, [&] {
    bias_gelu_rows<scalar_t>(out.data_ptr<scalar_t>(), N, b.empty() ? nullptr : b.data(),
                             save_pre ? pre.data_ptr<scalar_t>() : nullptr, N, M, N, tanh_approx);
  });
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                                   const at::Tensor& weight, const at::Tensor& pre,
                                                                   c10::string_view approximate, bool has_bias) {
  const bool tanh_approx = parse_approximate(approximate, kLgBwd);
  check_rows(x, kLgBwd, "x");
  FASTLM_CHECK(x.device().is_cpu(), kLgBwd, "x must be a CPU tensor, got ", x.device());
  const int64_t M = x.size(0), K = x.size(1);
  FASTLM_CHECK(weight.dim() == 2, kLgBwd, "weight must be 2-D, got ", weight.sizes());
  const int64_t N = weight.size(0);
  check_weight(weight, N, K, x, kLgBwd, "weight");
  for (const auto& [t, name] : {std::pair{&dy, "dy"}, std::pair{&pre, "pre"}}) {
    check_rows(*t, kLgBwd, name);
    FASTLM_CHECK(t->size(0) == M && t->size(1) == N, kLgBwd, name, " must have shape (", M, ", ", N, "), got ",
                 t->sizes());
    check_same(*t, x, kLgBwd, name);
  }
  // dpre starts as a copy of dy and becomes dy * gelu'(pre) in place; it then drives both GEMMs.
  auto dpre = at::empty({M, N}, x.options());
  const int64_t chunks = num_chunks(M);
  auto db_part = at::zeros({has_bias ? chunks : 0, N}, x.options().dtype(at::kFloat));
  if (M > 0) dpre.copy_(dy);
  FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kLgBwd, [&] {
    dgelu_rows<scalar_t>(dpre.data_ptr<scalar_t>(), N, pre.data_ptr<scalar_t>(), pre.stride(0), nullptr, 0,
                         has_bias ? db_part.data_ptr<float>() : nullptr, chunks, M, N, tanh_approx);
  });
  auto dx = matmul(dpre, weight);
  auto dweight = weight_grad(weight, dpre.t(), x);
  auto dbias = has_bias ? db_part.sum(0).to(x.scalar_type()) : at::empty({0}, x.options());
  return {dx, dweight, dbias};
}

// ---- gelu_ffn ----

std::tuple<at::Tensor, at::Tensor> gelu_ffn_fwd_cpu(const at::Tensor& x, const at::Tensor& fc1_weight,
                                                    const std::optional<at::Tensor>& fc1_bias,
                                                    const at::Tensor& fc2_weight,
                                                    const std::optional<at::Tensor>& fc2_bias,
                                                    c10::string_view approximate, bool save_pre) {
  const bool tanh_approx = parse_approximate(approximate, kFfnFwd);
  check_rows(x, kFfnFwd, "x");
  FASTLM_CHECK(x.device().is_cpu(), kFfnFwd, "x must be a CPU tensor, got ", x.device());
  const int64_t M = x.size(0), K = x.size(1);
  FASTLM_CHECK(fc1_weight.dim() == 2 && fc2_weight.dim() == 2, kFfnFwd, "fc1_weight and fc2_weight must be 2-D");
  const int64_t F = fc1_weight.size(0), N = fc2_weight.size(0);
  check_weight(fc1_weight, F, K, x, kFfnFwd, "fc1_weight");
  check_weight(fc2_weight, N, F, x, kFfnFwd, "fc2_weight");
  check_vector(fc1_bias, F, x, kFfnFwd, "fc1_bias");
  check_vector(fc2_bias, N, x, kFfnFwd, "fc2_bias");
  auto pre = new_output({save_pre ? M : 0, F}, x.options());
  if (M == 0) return {new_output({M, N}, x.options()), pre};
  const auto b1 = float_vector(opt_ptr(fc1_bias), F);
  const at::Tensor* b2 = opt_ptr(fc2_bias);
  const int64_t BM = std::min(M, block_rows(F));
  const bool one_block = BM >= M;  // the GEMMs' own outputs are the results (no copy)
  at::Tensor out = one_block ? at::Tensor() : new_output({M, N}, x.options());
  at::Tensor hidden;  // BLAS: the block's activation buffer, reused by every block
  const auto w1t = fc1_weight.t(), w2t = fc2_weight.t();
  for (int64_t r0 = 0; r0 < M; r0 += BM) {
    const int64_t m = std::min(BM, M - r0);
    at::Tensor h;  // (m, F) row-major
    if (one_block || uses_onednn(x)) {
      h = matmul(x.narrow(0, r0, m), w1t);
    } else {
      if (!hidden.defined()) hidden = at::empty({BM, F}, x.options());
      h = hidden.narrow(0, 0, m);
      matmul_into(x.narrow(0, r0, m), w1t, h);
    }
    FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kFfnFwd, [&] {
      bias_gelu_rows<scalar_t>(h.data_ptr<scalar_t>(), F, b1.empty() ? nullptr : b1.data(),
                               save_pre ? pre.data_ptr<scalar_t>() + r0 * F : nullptr, F, m, F, tanh_approx);
    });
    if (one_block) out = matmul(h, w2t, b2); else matmul_into(h, w2t, out.narrow(0, r0, m), b2);
  }
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gelu_ffn_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
    const at::Tensor& pre, c10::string_view approximate, bool has_fc1_bias, bool has_fc2_bias) {
  const bool tanh_approx = parse_approximate(approximate, kFfnBwd);
  check_rows(x, kFfnBwd, "x");
  FASTLM_CHECK(x.device().is_cpu(), kFfnBwd, "x must be a CPU tensor, got ", x.device());
  const int64_t M = x.size(0), K = x.size(1);
  FASTLM_CHECK(fc1_weight.dim() == 2 && fc2_weight.dim() == 2, kFfnBwd, "fc1_weight and fc2_weight must be 2-D");
  const int64_t F = fc1_weight.size(0), N = fc2_weight.size(0);
  check_weight(fc1_weight, F, K, x, kFfnBwd, "fc1_weight");
  check_weight(fc2_weight, N, F, x, kFfnBwd, "fc2_weight");
  for (const auto& [t, name, cols] : {std::tuple{&dy, "dy", N}, std::tuple{&pre, "pre", F}}) {
    check_rows(*t, kFfnBwd, name);
    FASTLM_CHECK(t->size(0) == M && t->size(1) == cols, kFfnBwd, name, " must have shape (", M, ", ", cols,
                 "), got ", t->sizes());
    check_same(*t, x, kFfnBwd, name);
  }
  const int64_t chunks = num_chunks(std::min(M, block_rows(F)));
  auto db1_part = at::zeros({has_fc1_bias ? chunks : 0, F}, x.options().dtype(at::kFloat));
  const int64_t BM = std::max<int64_t>(1, std::min(M, block_rows(F)));
  const bool one_block = M > 0 && BM >= M;  // the GEMMs' own outputs are dpre and dx (no copy)
  auto act = at::empty({M, F}, x.options());  // gelu(pre), for dW2
  // dy @ W2, then * gelu'(pre) in place (row-major (M, F))
  at::Tensor dpre = one_block ? at::Tensor() : at::empty({M, F}, x.options());
  at::Tensor dx = one_block ? at::Tensor() : new_output({M, K}, x.options());
  for (int64_t r0 = 0; r0 < M; r0 += BM) {
    const int64_t m = std::min(BM, M - r0);
    at::Tensor d;
    if (one_block) {
      d = dpre = matmul(dy, fc2_weight);
    } else {
      d = dpre.narrow(0, r0, m);
      matmul_into(dy.narrow(0, r0, m), fc2_weight, d);
    }
    FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kFfnBwd, [&] {
      dgelu_rows<scalar_t>(d.data_ptr<scalar_t>(), F, pre.data_ptr<scalar_t>() + r0 * pre.stride(0), pre.stride(0),
                           act.data_ptr<scalar_t>() + r0 * F, F,
                           has_fc1_bias ? db1_part.data_ptr<float>() : nullptr, std::min(chunks, m), m, F,
                           tanh_approx);
    });
    if (one_block) dx = matmul(d, fc1_weight); else matmul_into(d, fc1_weight, dx.narrow(0, r0, m));
  }
  auto dw2 = weight_grad(fc2_weight, dy.t(), act);
  auto dw1 = weight_grad(fc1_weight, dpre.t(), x);
  auto db1 = has_fc1_bias ? db1_part.sum(0).to(x.scalar_type()) : at::empty({0}, x.options());
  auto db2 = has_fc2_bias ? at::sum(dy, {0}, false, at::kFloat).to(x.scalar_type()) : at::empty({0}, x.options());
  return {dx, dw1, db1, dw2, db2};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm_C, CPU, m) {
  m.impl("linear_gelu_fwd", &linear_gelu_fwd_cpu);
  m.impl("linear_gelu_bwd", &linear_gelu_bwd_cpu);
  m.impl("gelu_ffn_fwd", &gelu_ffn_fwd_cpu);
  m.impl("gelu_ffn_bwd", &gelu_ffn_bwd_cpu);
}

}  // namespace fastlm::cpu
