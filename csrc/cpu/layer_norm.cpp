// LayerNorm (optionally on x + residual) forward and backward on the CPU.
//
// Tiling: at::parallel_for over rows; each task converts its row to an fp32 scratch row that stays in
// L1/L2 and makes vectorized (at::vec, AVX2) passes over it: sum -> mean, sum of squared deviations
// -> rstd (two-pass, so no cancellation), then the normalized output. One read and one write of
// the row in memory. Backward: rows are split into one contiguous chunk per thread; each chunk
// accumulates dweight/dbias in its own fp32 row of a (chunks, N) buffer, summed at the end, so the
// result does not depend on scheduling.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common.h"
#include "cpu/vec_utils.h"
#include "fastlm_math.h"

namespace fastlm::cpu {
namespace {

constexpr const char* kFwd = "layer_norm_fwd";
constexpr const char* kBwd = "layer_norm_bwd";

// Parameters as fp32 rows (N is small next to M*N: converting once is cheaper than per row).
std::vector<float> float_param(const at::Tensor* p, int64_t n, float fill) {
  std::vector<float> out(n, fill);
  if (p == nullptr) return out;
  FASTLM_DISPATCH_FLOAT_TYPES(p->scalar_type(), "float_param", [&] {
    row_to_float(p->data_ptr<scalar_t>(), out.data(), n);
  });
  return out;
}

template <typename T>
void layer_norm_fwd_rows(const at::Tensor& x, const at::Tensor* residual, const std::vector<float>& w,
                         const std::vector<float>& b, float eps, at::Tensor& out, at::Tensor& summed,
                         at::Tensor& mean, at::Tensor& rstd) {
  const int64_t M = x.size(0), N = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* rp = residual ? residual->data_ptr<T>() : nullptr;
  const int64_t sx = x.stride(0), sr = residual ? residual->stride(0) : 0;
  T* op = out.data_ptr<T>();
  T* sp = residual ? summed.data_ptr<T>() : nullptr;
  float* meanp = mean.data_ptr<float>();
  float* rstdp = rstd.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1));

  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> xbuf(N), tmp(rp ? N : 0);
    for (int64_t row = begin; row < end; ++row) {
      const float* xf;
      if (rp) {
        // summed = x + residual, rounded to T: the row that is normalized is exactly the one returned.
        row_to_float(xp + row * sx, xbuf.data(), N);
        row_to_float(rp + row * sr, tmp.data(), N);
        int64_t i = 0;
        for (; i + fVec::size() <= N; i += fVec::size())
          (fVec::loadu(xbuf.data() + i) + fVec::loadu(tmp.data() + i)).store(xbuf.data() + i);
        for (; i < N; ++i) xbuf[i] += tmp[i];
        row_from_float(xbuf.data(), sp + row * N, N);
        if constexpr (!std::is_same_v<T, float>) row_to_float(sp + row * N, xbuf.data(), N);
        xf = xbuf.data();
      } else if constexpr (std::is_same_v<T, float>) {
        xf = xp + row * sx;
      } else {
        row_to_float(xp + row * sx, xbuf.data(), N);
        xf = xbuf.data();
      }
      const float mu = row_sum(xf, N) / N;
      const float r = 1.f / std::sqrt(row_sum_sq_dev(xf, mu, N) / N + eps);
      meanp[row] = mu;
      rstdp[row] = r;
      // y = (x - mean) * rstd * w + b, written to the output row (fp32) or to xbuf then converted.
      float* yf;
      if constexpr (std::is_same_v<T, float>) yf = op + row * N; else yf = xbuf.data();
      const fVec vmu(mu), vr(r);
      int64_t i = 0;
      for (; i + fVec::size() <= N; i += fVec::size()) {
        fVec xh = (fVec::loadu(xf + i) - vmu) * vr;
        at::vec::fmadd(xh, fVec::loadu(w.data() + i), fVec::loadu(b.data() + i)).store(yf + i);
      }
      for (; i < N; ++i) yf[i] = (xf[i] - mu) * r * w[i] + b[i];
      if constexpr (!std::is_same_v<T, float>) row_from_float(yf, op + row * N, N);
    }
  });
}

template <typename T>
void layer_norm_bwd_rows(const at::Tensor& dy, const at::Tensor& x, const std::vector<float>& w,
                         const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor* dsummed,
                         at::Tensor& dx, at::Tensor& dw_part, at::Tensor& db_part, bool need_dw, bool need_db) {
  const int64_t M = x.size(0), N = x.size(1);
  const int64_t chunks = dw_part.size(0);
  const T* dyp = dy.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* dsp = dsummed ? dsummed->data_ptr<T>() : nullptr;
  const int64_t sdy = dy.stride(0), sx = x.stride(0), sds = dsummed ? dsummed->stride(0) : 0;
  const float* meanp = mean.data_ptr<float>();
  const float* rstdp = rstd.data_ptr<float>();
  T* dxp = dx.data_ptr<T>();
  float* dwp = dw_part.data_ptr<float>();
  float* dbp = db_part.data_ptr<float>();

  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    std::vector<float> xh(N), dyf(N), g(N), ds(dsp ? N : 0);
    for (int64_t c = cbegin; c < cend; ++c) {
      float* dw = dwp + c * N;
      float* db = dbp + c * N;
      const int64_t rbegin = c * M / chunks, rend = (c + 1) * M / chunks;
      for (int64_t row = rbegin; row < rend; ++row) {
        row_to_float(xp + row * sx, xh.data(), N);
        row_to_float(dyp + row * sdy, dyf.data(), N);
        const float mu = meanp[row], r = rstdp[row];
        const fVec vmu(mu), vr(r);
        fVec sg(0.f), sgx(0.f);
        int64_t i = 0;
        for (; i + fVec::size() <= N; i += fVec::size()) {
          fVec xv = (fVec::loadu(xh.data() + i) - vmu) * vr;
          fVec dv = fVec::loadu(dyf.data() + i);
          fVec gv = dv * fVec::loadu(w.data() + i);
          xv.store(xh.data() + i);
          gv.store(g.data() + i);
          sg += gv;
          sgx = at::vec::fmadd(gv, xv, sgx);
          if (need_dw) at::vec::fmadd(dv, xv, fVec::loadu(dw + i)).store(dw + i);
          if (need_db) (fVec::loadu(db + i) + dv).store(db + i);
        }
        float sum_g = at::vec::vec_reduce_all<float>([](fVec& p, fVec& q) { return p + q; }, sg);
        float sum_gx = at::vec::vec_reduce_all<float>([](fVec& p, fVec& q) { return p + q; }, sgx);
        for (; i < N; ++i) {
          float xv = (xh[i] - mu) * r, gv = dyf[i] * w[i];
          xh[i] = xv;
          g[i] = gv;
          sum_g += gv;
          sum_gx += gv * xv;
          if (need_dw) dw[i] += dyf[i] * xv;
          if (need_db) db[i] += dyf[i];
        }
        const float mean_g = sum_g / N, mean_gx = sum_gx / N;
        // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) [+ dsummed]; written into g, then stored.
        const fVec vmg(mean_g), vmgx(mean_gx);
        if (dsp) row_to_float(dsp + row * sds, ds.data(), N);
        i = 0;
        for (; i + fVec::size() <= N; i += fVec::size()) {
          fVec d = vr * (fVec::loadu(g.data() + i) - vmg - fVec::loadu(xh.data() + i) * vmgx);
          if (dsp) d += fVec::loadu(ds.data() + i);
          d.store(g.data() + i);
        }
        for (; i < N; ++i) {
          g[i] = layer_norm_dx(g[i], xh[i], mean_g, mean_gx, r) + (dsp ? ds[i] : 0.f);
        }
        row_from_float(g.data(), dxp + row * N, N);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  check_rows(x, kFwd, "x");
  FASTLM_CHECK(x.device().is_cpu(), kFwd, "x must be a CPU tensor, got ", x.device());
  const int64_t M = x.size(0), N = x.size(1);
  FASTLM_CHECK(N > 0, kFwd, "x must have at least one column");
  if (auto r = opt_ptr(residual)) {
    check_rows(*r, kFwd, "residual");
    check_same_shape(*r, x, kFwd, "residual");
  }
  check_vector(weight, N, x, kFwd, "weight");
  check_vector(bias, N, x, kFwd, "bias");
  auto out = new_output({M, N}, x.options());
  auto summed = new_output({opt_ptr(residual) ? M : 0, N}, x.options());
  auto mean = new_output({M}, x.options().dtype(at::kFloat));
  auto rstd = new_output({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {out, summed, mean, rstd};
  auto w = float_param(opt_ptr(weight), N, 1.f);
  auto b = float_param(opt_ptr(bias), N, 0.f);
  FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kFwd, [&] {
    layer_norm_fwd_rows<scalar_t>(x, opt_ptr(residual), w, b, static_cast<float>(eps), out, summed, mean, rstd);
  });
  return {out, summed, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& dsummed, bool has_bias) {
  check_rows(x, kBwd, "x");
  FASTLM_CHECK(x.device().is_cpu(), kBwd, "x must be a CPU tensor, got ", x.device());
  check_rows(dy, kBwd, "dy");
  check_same_shape(dy, x, kBwd, "dy");
  if (auto d = opt_ptr(dsummed)) {
    check_rows(*d, kBwd, "dsummed");
    check_same_shape(*d, x, kBwd, "dsummed");
  }
  const int64_t M = x.size(0), N = x.size(1);
  check_vector(weight, N, x, kBwd, "weight");
  FASTLM_CHECK(mean.scalar_type() == at::kFloat && mean.is_contiguous() && mean.numel() == M, kBwd,
               "mean must be a contiguous fp32 tensor of ", M, " elements");
  FASTLM_CHECK(rstd.scalar_type() == at::kFloat && rstd.is_contiguous() && rstd.numel() == M, kBwd,
               "rstd must be a contiguous fp32 tensor of ", M, " elements");
  const bool need_dw = opt_ptr(weight) != nullptr;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(M, at::get_num_threads()));
  auto dx = new_output({M, N}, x.options());
  auto dw_part = at::zeros({chunks, N}, x.options().dtype(at::kFloat));
  auto db_part = at::zeros({chunks, N}, x.options().dtype(at::kFloat));
  if (M > 0) {
    auto w = float_param(opt_ptr(weight), N, 1.f);
    FASTLM_DISPATCH_FLOAT_TYPES(x.scalar_type(), kBwd, [&] {
      layer_norm_bwd_rows<scalar_t>(dy, x, w, mean, rstd, opt_ptr(dsummed), dx, dw_part, db_part, need_dw, has_bias);
    });
  }
  auto dweight = need_dw ? dw_part.sum(0).to(x.scalar_type()) : at::empty({0}, x.options());
  auto dbias = has_bias ? db_part.sum(0).to(x.scalar_type()) : at::empty({0}, x.options());
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm_C, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace fastlm::cpu
