// LayerNorm (optionally on x + residual) forward and backward on the CPU.
//
// Tiling: at::parallel_for over rows; each task converts its row to an fp32 scratch row that stays in
// L1/L2 (fp32 rows: read in place, x + residual summed straight into the returned row) and makes vectorized (at::vec, AVX2) passes over it: sum -> mean, sum of squared deviations
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
#include "layer_norm_checks.h"
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
    std::vector<float> xbuf(std::is_same_v<T, float> ? 0 : N), tmp(rp && !std::is_same_v<T, float> ? N : 0);
    for (int64_t row = begin; row < end; ++row) {
      const float* xf;
      if constexpr (std::is_same_v<T, float>) {
        if (rp) {
          // fp32: summed = x + residual straight into the returned row, normalized from there (no copies)
          const float* xr = xp + row * sx;
          const float* rr = rp + row * sr;
          float* __restrict sr_out = sp + row * N;
          int64_t i = 0;
          for (; i + fVec::size() <= N; i += fVec::size())
            (fVec::loadu(xr + i) + fVec::loadu(rr + i)).store(sr_out + i);
          for (; i < N; ++i) sr_out[i] = xr[i] + rr[i];
          xf = sr_out;
        } else {
          xf = xp + row * sx;
        }
      } else if (rp) {
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
      } else {
        row_to_float(xp + row * sx, xbuf.data(), N);
        xf = xbuf.data();
      }
      const float mu = row_sum(xf, N) / N;
      const float r = 1.f / std::sqrt(row_sum_sq_dev(xf, mu, N) / N + eps);
      meanp[row] = mu;
      rstdp[row] = r;
      // y = (x - mean) * rstd * w + b, written to the output row (fp32) or to xbuf then converted.
      // Local restrict pointers: through the captured vectors, every store to yf would force the
      // compiler to reload w.data() and b.data() (they could alias).
      float* __restrict yf;
      if constexpr (std::is_same_v<T, float>) yf = op + row * N; else yf = xbuf.data();
      const float* __restrict wp = w.data();
      const float* __restrict bp = b.data();
      const fVec vmu(mu), vr(r);
      int64_t i = 0;
      for (; i + fVec::size() <= N; i += fVec::size()) {
        fVec xh = (fVec::loadu(xf + i) - vmu) * vr;
        at::vec::fmadd(xh, fVec::loadu(wp + i), fVec::loadu(bp + i)).store(yf + i);
      }
      for (; i < N; ++i) yf[i] = (xf[i] - mu) * r * wp[i] + bp[i];
      if constexpr (!std::is_same_v<T, float>) row_from_float(yf, op + row * N, N);
    }
  });
}

template <typename T>
void layer_norm_bwd_rows(const at::Tensor& dy, const at::Tensor& x, const std::vector<float>& w,
                         const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor* dsummed,
                         at::Tensor& dx, at::Tensor& dw_part, at::Tensor& db_part, bool need_dw, bool need_db) {
  constexpr bool kF32 = std::is_same_v<T, float>;
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
  const float* __restrict wp = w.data();
  auto add = [](fVec& p, fVec& q) { return p + q; };

  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    // fp32 rows are used in place; fp16/bf16 rows are converted once into these L1-resident buffers.
    std::vector<float> xbuf(kF32 ? 0 : N), dybuf(kF32 ? 0 : N), dsbuf(kF32 || !dsp ? 0 : N), obuf(kF32 ? 0 : N);
    for (int64_t c = cbegin; c < cend; ++c) {
      float* __restrict dw = dwp + c * N;
      float* __restrict db = dbp + c * N;
      const int64_t rbegin = c * M / chunks, rend = (c + 1) * M / chunks;
      for (int64_t row = rbegin; row < rend; ++row) {
        const float *xr, *dyr, *dsr = nullptr;
        float* out;
        if constexpr (kF32) {
          xr = xp + row * sx;
          dyr = dyp + row * sdy;
          if (dsp) dsr = dsp + row * sds;
          out = dxp + row * N;
        } else {
          row_to_float(xp + row * sx, xbuf.data(), N);
          row_to_float(dyp + row * sdy, dybuf.data(), N);
          if (dsp) {
            row_to_float(dsp + row * sds, dsbuf.data(), N);
            dsr = dsbuf.data();
          }
          xr = xbuf.data();
          dyr = dybuf.data();
          out = obuf.data();
        }
        const float mu = meanp[row], r = rstdp[row];
        const fVec vmu(mu), vr(r);
        // Pass 1: the row sums of g = dy * w and g * xhat, and this chunk's dweight/dbias.
        fVec sg0(0.f), sg1(0.f), sgx0(0.f), sgx1(0.f);
        const int64_t V = fVec::size();
        int64_t i = 0;
        for (; i + 2 * V <= N; i += 2 * V) {
          fVec x0 = (fVec::loadu(xr + i) - vmu) * vr, x1 = (fVec::loadu(xr + i + V) - vmu) * vr;
          fVec d0 = fVec::loadu(dyr + i), d1 = fVec::loadu(dyr + i + V);
          fVec g0 = d0 * fVec::loadu(wp + i), g1 = d1 * fVec::loadu(wp + i + V);
          sg0 += g0;
          sg1 += g1;
          sgx0 = at::vec::fmadd(g0, x0, sgx0);
          sgx1 = at::vec::fmadd(g1, x1, sgx1);
          if (need_dw) {
            at::vec::fmadd(d0, x0, fVec::loadu(dw + i)).store(dw + i);
            at::vec::fmadd(d1, x1, fVec::loadu(dw + i + V)).store(dw + i + V);
          }
          if (need_db) {
            (fVec::loadu(db + i) + d0).store(db + i);
            (fVec::loadu(db + i + V) + d1).store(db + i + V);
          }
        }
        float sum_g = at::vec::vec_reduce_all<float>(add, sg0 + sg1);
        float sum_gx = at::vec::vec_reduce_all<float>(add, sgx0 + sgx1);
        for (; i < N; ++i) {
          const float xv = (xr[i] - mu) * r, gv = dyr[i] * wp[i];
          sum_g += gv;
          sum_gx += gv * xv;
          if (need_dw) dw[i] += dyr[i] * xv;
          if (need_db) db[i] += dyr[i];
        }
        const float mean_g = sum_g / N, mean_gx = sum_gx / N;
        // Pass 2 (from L1): dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) [+ dsummed].
        const fVec vmg(mean_g), vmgx(mean_gx);
        i = 0;
        for (; i + V <= N; i += V) {
          fVec xv = (fVec::loadu(xr + i) - vmu) * vr;
          fVec gv = fVec::loadu(dyr + i) * fVec::loadu(wp + i);
          fVec d = vr * (gv - vmg - xv * vmgx);
          if (dsr) d += fVec::loadu(dsr + i);
          d.store(out + i);
        }
        for (; i < N; ++i) {
          out[i] = layer_norm_dx(dyr[i] * wp[i], (xr[i] - mu) * r, mean_g, mean_gx, r) + (dsr ? dsr[i] : 0.f);
        }
        if constexpr (!kF32) row_from_float(out, dxp + row * N, N);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  check_layer_norm_fwd_args(x, residual, weight, bias, /*is_cuda=*/false, kFwd);
  const int64_t M = x.size(0), N = x.size(1);
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
  check_layer_norm_bwd_args(dy, x, weight, mean, rstd, dsummed, /*is_cuda=*/false, kBwd);
  const int64_t M = x.size(0), N = x.size(1);
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
