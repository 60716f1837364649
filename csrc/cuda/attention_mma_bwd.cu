// Tensor-core flash-attention backward for fp16/bf16 (sm80+): the FlashAttention-2 backward
// (Dao 2023, https://arxiv.org/abs/2307.08691, Algorithm 2) with inline-PTX mma.sync.m16n8k16 and
// ldmatrix (helpers and fragment layouts: attention_mma.cuh, attention_mma.cu), fp32 accumulation.
// Same contract as the simple backward in attention.cu: lse is the forward's natural-log logsumexp
// (-inf for a row that sees no key: its p, and so its dq and its share of dk/dv, are 0), the additive
// mask of the input dtype is read through its strides, causal is top-left aligned (key j visible to
// query i iff j <= i), and dk/dv of a kv head sum over the query heads of its GQA group.
// attention_bwd_mma_launch returns false, launching nothing, for fp32, dropout, Dv != D, D > 128 (a
// 256-wide dK and dV pair alone would take 256 fp32 registers per lane), non-contiguous outputs and
// pre-sm80 devices; attention_cuda.cpp then runs the simple kernels. Gated with the forward by
// FASTLM_CUDA_ATTENTION_MMA=1. Compile-checked and emulated lane by lane in numpy; not yet run on a GPU.
//
// Three kernels, all on the current stream, deterministic (no atomics; every output element has one
// writer):
//   1. delta = rowsum(dO * O), fp32 (B, H, Sq): one warp per query row.
//   2. dQ: one block of 4 warps per (b, h, 64-query tile); warp w owns query rows [16 w, 16 w + 16)
//      of the tile, whose Q and dO stay in shared memory. The block streams N-key K/V tiles of its kv
//      head (N = 64 for head dims padded to 64, 32 for 128; double-buffered with cp.async; causal: only
//      tiles up to the block's last row). Per tile each warp computes S = Q K^T and dP = dO V^T
//      (16 x N, mma), P = exp(S * scale + mask - lse), dS = P * (dP - delta), and dQ += dS K with dS
//      rounded to the input dtype; dq = dQ * scale at the end.
//   3. dK/dV: one block of 4 warps per (b, kv head, 64-key tile); warp w owns keys [16 w, 16 w + 16),
//      whose K and V stay in shared memory. The block streams M-query tiles (M = 64 / 32 as N above,
//      double-buffered, with their lse and delta) of every query head of the GQA group in turn
//      (causal: from the tile holding the block's first key). Per tile each warp computes the
//      transposed products S^T = K Q^T and dP^T = V dO^T (16 x M), P^T and dS^T as above, then
//      dV += P^T dO and dK += dS^T Q (P^T, dS^T rounded to the input dtype, as FA2 does); dk = dK * scale.
//   Everything is the forward's S = Q K^T / O += P V pattern with the roles of the operands swapped,
//   so the same three ldmatrix address patterns serve (see a_off, bn_off, bt_off below).
// Warps whose rows lie past the tensor, or whose tile is wholly above the causal diagonal, skip the
// math of that tile (warp-uniform) but keep every barrier.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/attention.h"
#include "cuda/attention_mma.cuh"

namespace fastlm::cuda {
namespace {

using namespace mma;  // NOLINT: the shared tensor-core helpers (attention_mma.cuh)

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockRows = 16 * kWarps;  // resident rows per block: 64 queries (dQ) or 64 keys (dK/dV)

// Rows of a streamed tile (keys for dQ, queries for dK/dV): 64, or 32 for head dims padded to 128, where
// the 16 x 128 fp32 accumulators (two of them in dK/dV) leave room for only 32-wide S and dP tiles.
template <int DP>
constexpr int stream_rows() {
  return DP > 64 ? 32 : 64;
}

// Shared memory of either kernel: two resident 64-row tiles and two double-buffered streamed tiles
// (b16, rows padded by kSmemPad), plus the dK/dV kernel's double-buffered lse and delta (fp32).
template <int DP>
constexpr size_t smem_bytes() {
  return sizeof(uint16_t) * (2 * kBlockRows + 4 * stream_rows<DP>()) * (DP + kSmemPad) +
         sizeof(float) * 4 * stream_rows<DP>();
}

struct BwdParams {
  const uint16_t* q;     // (B, H, Sq, D), raw fp16/bf16 bits, last dims contiguous
  const uint16_t* k;     // (B, Hkv, Sk, D)
  const uint16_t* v;     // (B, Hkv, Sk, D)
  const uint16_t* mask;  // additive (B, H, Sq, Sk) any strides, or nullptr
  const uint16_t* dout;  // (B, H, Sq, D)
  const uint16_t* out;   // (B, H, Sq, D)
  const float* lse;      // (B, H, Sq) contiguous
  float* delta;          // (B, H, Sq) contiguous, written by kernel 1
  uint16_t* dq;          // (B, H, Sq, D) contiguous
  uint16_t* dk;          // (B, Hkv, Sk, D) contiguous
  uint16_t* dv;          // (B, Hkv, Sk, D) contiguous
  int64_t H, Hkv, Sq, Sk, group;
  int64_t qb, qh, qs, kb, kh, ks, vb, vh, vs, gb, gh, gs, ob, oh, os;  // strides; g: dout, o: out
  int64_t mb, mh, mq, mk;
  int D;
  float scale;
  bool causal;
  bool vec;  // q, k, v, dout rows can be read as aligned 16-byte chunks (cp.async)
};

// ldmatrix.x4 row addresses of this lane, in elements from the base of a 16-row slice of a shared
// tile (row stride kStride); the k-step / column offsets are added at each use:
//  a_off:  A fragment of a 16 x 16 block (rows = mma rows, columns = k), non-transposed;
//  bn_off: B fragments of two 8-column n-tiles when the tile is stored n-major (rows = mma columns,
//          columns = k), non-transposed (K in S = Q K^T);
//  bt_off: B fragments of two 8-column n-tiles when the tile is stored k-major (rows = k, columns =
//          mma columns), loaded with .trans (V in O = P V).
template <int kStride>
__device__ __forceinline__ int a_off(int lane) {
  return (lane % 16) * kStride + (lane / 16) * 8;
}
template <int kStride>
__device__ __forceinline__ int bn_off(int lane) {
  return ((lane / 16) * 8 + lane % 8) * kStride + ((lane / 8) % 2) * 8;
}
template <int kStride>
__device__ __forceinline__ int bt_off(int lane) {
  return (((lane / 8) % 2) * 8 + lane % 8) * kStride + (lane / 16) * 8;
}

// The A fragment of k-step kk (16 columns) from fp32 accumulator tiles 2 kk and 2 kk + 1, rounded to
// the input dtype (layout: attention_mma.cu, "P (A of P V)").
template <class Dt, int kTiles>
__device__ __forceinline__ void pack_a(uint32_t (&a)[4], const float (&c)[kTiles][4], int kk) {
  a[0] = Dt::pack(c[2 * kk][0], c[2 * kk][1]);
  a[1] = Dt::pack(c[2 * kk][2], c[2 * kk][3]);
  a[2] = Dt::pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = Dt::pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// acc (16 x DP, fp32) * scale to rows [row0, row0 + 16) of a contiguous (rows, D) output; rows >= n
// and columns >= D are not written.
template <class Dt, int kDTiles>
__device__ __forceinline__ void store_rows(uint16_t* dst, const float (&acc)[kDTiles][4], float scale, int64_t row0,
                                           int64_t n, int D, int lane) {
  const int g = lane / 4, t4 = lane % 4;
  const bool pairs = (D % 2) == 0;  // two adjacent outputs form one aligned 32-bit store
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = row0 + g + 8 * r;
    if (i >= n) continue;
    uint16_t* row = dst + i * D;
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      const int col = d * 8 + 2 * t4;
      const float v0 = acc[d][2 * r] * scale, v1 = acc[d][2 * r + 1] * scale;
      if (pairs && col + 1 < D) {
        *reinterpret_cast<uint32_t*>(row + col) =
            static_cast<uint32_t>(Dt::from_float(v0)) | (static_cast<uint32_t>(Dt::from_float(v1)) << 16);
      } else {
        if (col < D) row[col] = Dt::from_float(v0);
        if (col + 1 < D) row[col + 1] = Dt::from_float(v1);
      }
    }
  }
}

// 1. delta[b, h, i] = sum_d dout[b, h, i, d] * out[b, h, i, d] (fp32); one warp per row.
template <bool kBf16>
__global__ void __launch_bounds__(kThreads) attn_bwd_delta_mma_kernel(BwdParams p, int64_t rows) {
  using Dt = Dtype<kBf16>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // warp-uniform
  const int64_t bh = row / p.Sq, i = row % p.Sq, b = bh / p.H, h = bh % p.H;
  const uint16_t* o = p.out + b * p.ob + h * p.oh + i * p.os;
  const uint16_t* g = p.dout + b * p.gb + h * p.gh + i * p.gs;
  float s = 0.f;
  for (int d = lane; d < p.D; d += 32) s += Dt::to_float(o[d]) * Dt::to_float(g[d]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) p.delta[row] = s;
}

// 2. dQ (tiling at the top of the file).
template <int DP, bool kBf16>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_mma_kernel(BwdParams p, int64_t m_blocks) {
  using Dt = Dtype<kBf16>;
  constexpr int kN = stream_rows<DP>();
  constexpr int kStride = DP + kSmemPad;
  constexpr int kNTiles = kN / 8;     // 8-key accumulator tiles of S and dP
  constexpr int kDTiles = DP / 8;     // 8-dim accumulator tiles of dQ
  constexpr int kTile = kN * kStride;  // elements of one streamed tile buffer
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sQ = smem;                       // 64 x DP
  uint16_t* sG = sQ + kBlockRows * kStride;  // dO, 64 x DP
  uint16_t* sK = sG + kBlockRows * kStride;  // 2 buffers of kN x DP
  uint16_t* sV = sK + 2 * kTile;             // 2 buffers of kN x DP

  const int64_t bh = blockIdx.x / m_blocks;
  // Last query tiles first: with causal masking they loop over the most key tiles.
  const int64_t m_blk = m_blocks - 1 - static_cast<int64_t>(blockIdx.x % m_blocks);
  const int64_t b = bh / p.H, h = bh % p.H, hk = h / p.group;
  const int64_t m0 = m_blk * kBlockRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t4 = lane % 4;
  const int64_t warp_row0 = m0 + 16 * warp;
  const int64_t rows[2] = {warp_row0 + lane / 4, warp_row0 + lane / 4 + 8};  // this lane's two query rows
  const bool warp_live = warp_row0 < p.Sq;
  float row_lse[2], row_delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool ok = rows[r] < p.Sq;
    row_lse[r] = ok ? p.lse[bh * p.Sq + rows[r]] : neg_inf();
    row_delta[r] = ok ? p.delta[bh * p.Sq + rows[r]] : 0.f;
  }

  const uint16_t* kbase = p.k + b * p.kb + hk * p.kh;
  const uint16_t* vbase = p.v + b * p.vb + hk * p.vh;
  const uint16_t* mbase = p.mask != nullptr ? p.mask + b * p.mb + h * p.mh : nullptr;
  // Keys [0, kend) can be visible to some row of this block.
  const int64_t kend = p.causal ? min(p.Sk, min(p.Sq, m0 + kBlockRows)) : p.Sk;
  const int64_t n_tiles = (kend + kN - 1) / kN;

  load_tile<DP, kBlockRows, kThreads>(sQ, p.q + b * p.qb + h * p.qh, p.qs, m0, p.Sq, p.D, p.vec);
  load_tile<DP, kBlockRows, kThreads>(sG, p.dout + b * p.gb + h * p.gh, p.gs, m0, p.Sq, p.D, p.vec);
  if (n_tiles > 0) {
    load_tile<DP, kN, kThreads>(sK, kbase, p.ks, 0, p.Sk, p.D, p.vec);
    load_tile<DP, kN, kThreads>(sV, vbase, p.vs, 0, p.Sk, p.D, p.vec);
  }
  cp_async_commit();

  const uint32_t q_addr = smem_addr(sQ + 16 * warp * kStride + a_off<kStride>(lane));
  const uint32_t g_addr = smem_addr(sG + 16 * warp * kStride + a_off<kStride>(lane));
  const int bn = bn_off<kStride>(lane), bt = bt_off<kStride>(lane);

  float acc[kDTiles][4];
#pragma unroll
  for (int d = 0; d < kDTiles; ++d) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.f;

  for (int64_t tile = 0; tile < n_tiles; ++tile) {
    const int buf = static_cast<int>(tile & 1);
    const int64_t j0 = tile * kN;
    cp_async_wait_all();
    __syncthreads();  // tile `tile` (and Q, dO) landed; every warp is done with buffer buf ^ 1
    if (tile + 1 < n_tiles) {
      load_tile<DP, kN, kThreads>(sK + (buf ^ 1) * kTile, kbase, p.ks, j0 + kN, p.Sk, p.D, p.vec);
      load_tile<DP, kN, kThreads>(sV + (buf ^ 1) * kTile, vbase, p.vs, j0 + kN, p.Sk, p.D, p.vec);
    }
    cp_async_commit();
    // Warp-uniform: rows past Sq, or (causal) a tile whose first key is after the warp's last row.
    if (!warp_live || (p.causal && j0 > warp_row0 + 15)) continue;
    const uint32_t k_addr = smem_addr(sK + buf * kTile), v_addr = smem_addr(sV + buf * kTile);

    // S = Q K^T and dP = dO V^T (16 x kN per warp); k-steps wholly in the zero padding of D skipped.
    float s[kNTiles][4], dp[kNTiles][4];
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
      dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      if (kk * 16 < p.D) {
        uint32_t aq[4], ag[4];
        ldsm_x4(aq, q_addr + kk * 16 * 2);
        ldsm_x4(ag, g_addr + kk * 16 * 2);
#pragma unroll
        for (int n2 = 0; n2 < kN / 16; ++n2) {
          const uint32_t off = (bn + n2 * 16 * kStride + kk * 16) * 2;
          uint32_t bk[4], bv[4];
          ldsm_x4(bk, k_addr + off);
          ldsm_x4(bv, v_addr + off);
          Dt::mma(s[2 * n2], aq, bk[0], bk[1]);
          Dt::mma(s[2 * n2 + 1], aq, bk[2], bk[3]);
          Dt::mma(dp[2 * n2], ag, bv[0], bv[1]);
          Dt::mma(dp[2 * n2 + 1], ag, bv[2], bv[3]);
        }
      }
    }

    // dS = P * (dP - delta), P = exp(S * scale + mask - lse); P = 0 for keys past Sk, rows past Sq,
    // keys past the causal diagonal and rows with lse = -inf (they saw no key). Kept in dp.
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t i = rows[e / 2];
        const int64_t j = j0 + n * 8 + 2 * t4 + (e % 2);
        const float L = row_lse[e / 2];
        float pr = 0.f;
        if (j < p.Sk && i < p.Sq && !(p.causal && j > i) && L != neg_inf()) {
          float x = s[n][e] * p.scale;
          if (mbase != nullptr) x += Dt::to_float(mbase[i * p.mq + j * p.mk]);
          pr = exp2f((x - L) * kLog2e);  // 0 for a key masked with -inf
        }
        dp[n][e] = pr * (dp[n][e] - row_delta[e / 2]);
      }
    }

    // dQ += dS K: K is stored key-major and the key is the k index here, so .trans (like V in P V).
#pragma unroll
    for (int kk = 0; kk < kN / 16; ++kk) {
      uint32_t a[4];
      pack_a<Dt>(a, dp, kk);
#pragma unroll
      for (int d2 = 0; d2 < DP / 16; ++d2) {
        if (d2 * 16 < p.D) {  // dims wholly past D are never stored
          uint32_t bk[4];
          ldsm_x4_trans(bk, k_addr + (bt + kk * 16 * kStride + d2 * 16) * 2);
          Dt::mma(acc[2 * d2], a, bk[0], bk[1]);
          Dt::mma(acc[2 * d2 + 1], a, bk[2], bk[3]);
        }
      }
    }
  }
  cp_async_wait_all();  // nothing is in flight here (the last tile issues no copy); kept for safety
  store_rows<Dt>(p.dq + bh * p.Sq * p.D, acc, p.scale, warp_row0, p.Sq, p.D, lane);
}

// 3. dK and dV (tiling at the top of the file).
template <int DP, bool kBf16>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_mma_kernel(BwdParams p, int64_t n_blocks) {
  using Dt = Dtype<kBf16>;
  constexpr int kM = stream_rows<DP>();
  constexpr int kStride = DP + kSmemPad;
  constexpr int kMTiles = kM / 8;     // 8-query accumulator tiles of S^T and dP^T
  constexpr int kDTiles = DP / 8;     // 8-dim accumulator tiles of dK and dV
  constexpr int kTile = kM * kStride;  // elements of one streamed tile buffer
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sK = smem;                       // 64 x DP
  uint16_t* sV = sK + kBlockRows * kStride;  // 64 x DP
  uint16_t* sQ = sV + kBlockRows * kStride;  // 2 buffers of kM x DP
  uint16_t* sG = sQ + 2 * kTile;             // dO, 2 buffers of kM x DP
  float* sL = reinterpret_cast<float*>(sG + 2 * kTile);  // lse, 2 buffers of kM
  float* sD = sL + 2 * kM;                               // delta, 2 buffers of kM

  const int64_t bhk = blockIdx.x / n_blocks, n_blk = blockIdx.x % n_blocks;
  const int64_t b = bhk / p.Hkv, hk = bhk % p.Hkv;
  const int64_t n0 = n_blk * kBlockRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t4 = lane % 4;
  const int64_t warp_key0 = n0 + 16 * warp;
  const int64_t keys[2] = {warp_key0 + lane / 4, warp_key0 + lane / 4 + 8};  // this lane's two keys
  const bool warp_live = warp_key0 < p.Sk;

  // Query tiles: queries i < n0 see no key of this block under causal masking. The block visits
  // tiles [qt0, nq) of each of the group's query heads: iteration it -> head it / per_head.
  const int64_t nq = (p.Sq + kM - 1) / kM;
  const int64_t qt0 = p.causal ? min(nq, n0 / kM) : 0;
  const int64_t per_head = nq - qt0;
  const int64_t iters = p.group * per_head;

  // Issue the copies of iteration `it` (Q, dO via cp.async; lse, delta via plain stores) into `buf`.
  auto issue = [&](int64_t it, int buf) {
    const int64_t h = hk * p.group + it / per_head, bh = b * p.H + h;
    const int64_t i0 = (qt0 + it % per_head) * kM;
    load_tile<DP, kM, kThreads>(sQ + buf * kTile, p.q + b * p.qb + h * p.qh, p.qs, i0, p.Sq, p.D, p.vec);
    load_tile<DP, kM, kThreads>(sG + buf * kTile, p.dout + b * p.gb + h * p.gh, p.gs, i0, p.Sq, p.D, p.vec);
    for (int r = threadIdx.x; r < kM; r += kThreads) {
      const int64_t i = i0 + r;
      sL[buf * kM + r] = i < p.Sq ? p.lse[bh * p.Sq + i] : neg_inf();
      sD[buf * kM + r] = i < p.Sq ? p.delta[bh * p.Sq + i] : 0.f;
    }
  };

  load_tile<DP, kBlockRows, kThreads>(sK, p.k + b * p.kb + hk * p.kh, p.ks, n0, p.Sk, p.D, p.vec);
  load_tile<DP, kBlockRows, kThreads>(sV, p.v + b * p.vb + hk * p.vh, p.vs, n0, p.Sk, p.D, p.vec);
  if (iters > 0) issue(0, 0);
  cp_async_commit();

  const uint32_t k_addr = smem_addr(sK + 16 * warp * kStride + a_off<kStride>(lane));
  const uint32_t v_addr = smem_addr(sV + 16 * warp * kStride + a_off<kStride>(lane));
  const int bn = bn_off<kStride>(lane), bt = bt_off<kStride>(lane);

  float dk[kDTiles][4], dv[kDTiles][4];
#pragma unroll
  for (int d = 0; d < kDTiles; ++d) {
    dk[d][0] = dk[d][1] = dk[d][2] = dk[d][3] = 0.f;
    dv[d][0] = dv[d][1] = dv[d][2] = dv[d][3] = 0.f;
  }

  for (int64_t it = 0; it < iters; ++it) {
    const int buf = static_cast<int>(it & 1);
    const int64_t h = hk * p.group + it / per_head;
    const int64_t i0 = (qt0 + it % per_head) * kM;
    cp_async_wait_all();
    __syncthreads();  // iteration it's tiles (and K, V) landed; every warp is done with buffer buf ^ 1
    if (it + 1 < iters) issue(it + 1, buf ^ 1);
    cp_async_commit();
    // Warp-uniform: keys past Sk, or (causal) a query tile wholly before the warp's first key.
    if (!warp_live || (p.causal && i0 + kM - 1 < warp_key0)) continue;
    const uint32_t q_addr = smem_addr(sQ + buf * kTile), g_addr = smem_addr(sG + buf * kTile);
    const float* tile_lse = sL + buf * kM;
    const float* tile_delta = sD + buf * kM;
    const uint16_t* mbase = p.mask != nullptr ? p.mask + b * p.mb + h * p.mh : nullptr;

    // S^T = K Q^T and dP^T = V dO^T (16 keys x kM queries per warp).
    float s[kMTiles][4], dp[kMTiles][4];
#pragma unroll
    for (int n = 0; n < kMTiles; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
      dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      if (kk * 16 < p.D) {
        uint32_t ak[4], av[4];
        ldsm_x4(ak, k_addr + kk * 16 * 2);
        ldsm_x4(av, v_addr + kk * 16 * 2);
#pragma unroll
        for (int n2 = 0; n2 < kM / 16; ++n2) {
          const uint32_t off = (bn + n2 * 16 * kStride + kk * 16) * 2;
          uint32_t bq[4], bg[4];
          ldsm_x4(bq, q_addr + off);
          ldsm_x4(bg, g_addr + off);
          Dt::mma(s[2 * n2], ak, bq[0], bq[1]);
          Dt::mma(s[2 * n2 + 1], ak, bq[2], bq[3]);
          Dt::mma(dp[2 * n2], av, bg[0], bg[1]);
          Dt::mma(dp[2 * n2 + 1], av, bg[2], bg[3]);
        }
      }
    }

    // P^T (in s) and dS^T = P^T * (dP^T - delta) (in dp); element (key j, query i).
#pragma unroll
    for (int n = 0; n < kMTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t j = keys[e / 2];
        const int c = n * 8 + 2 * t4 + (e % 2);  // query column within the tile
        const int64_t i = i0 + c;
        const float L = tile_lse[c];  // -inf past Sq
        float pr = 0.f;
        if (j < p.Sk && i < p.Sq && !(p.causal && j > i) && L != neg_inf()) {
          float x = s[n][e] * p.scale;
          if (mbase != nullptr) x += Dt::to_float(mbase[i * p.mq + j * p.mk]);
          pr = exp2f((x - L) * kLog2e);
        }
        s[n][e] = pr;
        dp[n][e] = pr * (dp[n][e] - tile_delta[c]);
      }
    }

    // dV += P^T dO, dK += dS^T Q: dO and Q are stored query-major, the query is the k index: .trans.
#pragma unroll
    for (int kk = 0; kk < kM / 16; ++kk) {
      uint32_t ap[4], ads[4];
      pack_a<Dt>(ap, s, kk);
      pack_a<Dt>(ads, dp, kk);
#pragma unroll
      for (int d2 = 0; d2 < DP / 16; ++d2) {
        if (d2 * 16 < p.D) {
          const uint32_t off = (bt + kk * 16 * kStride + d2 * 16) * 2;
          uint32_t bg[4], bq[4];
          ldsm_x4_trans(bg, g_addr + off);
          ldsm_x4_trans(bq, q_addr + off);
          Dt::mma(dv[2 * d2], ap, bg[0], bg[1]);
          Dt::mma(dv[2 * d2 + 1], ap, bg[2], bg[3]);
          Dt::mma(dk[2 * d2], ads, bq[0], bq[1]);
          Dt::mma(dk[2 * d2 + 1], ads, bq[2], bq[3]);
        }
      }
    }
  }
  cp_async_wait_all();  // K/V copies of a block with no query tile are still waited for
  store_rows<Dt>(p.dk + bhk * p.Sk * p.D, dk, p.scale, warp_key0, p.Sk, p.D, lane);
  store_rows<Dt>(p.dv + bhk * p.Sk * p.D, dv, 1.f, warp_key0, p.Sk, p.D, lane);
}

template <class Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  // Above 48 KB dynamic shared memory needs an explicit opt-in (55 KB for DP = 64, 69 KB for DP = 128).
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

template <int DP, bool kBf16>
void launch_bwd(const BwdParams& p, int64_t B, cudaStream_t stream) {
  constexpr size_t kSmem = smem_bytes<DP>();
  const int64_t rows = B * p.H * p.Sq;
  if (rows > 0) {
    attn_bwd_delta_mma_kernel<kBf16><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
        p, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t m_blocks = (p.Sq + kBlockRows - 1) / kBlockRows;
    auto dq_kernel = attn_bwd_dq_mma_kernel<DP, kBf16>;
    set_smem(dq_kernel, kSmem);
    dq_kernel<<<static_cast<unsigned>(B * p.H * m_blocks), kThreads, kSmem, stream>>>(p, m_blocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // Runs even when Sq = 0: dk and dv are then zeros.
  const int64_t n_blocks = (p.Sk + kBlockRows - 1) / kBlockRows;
  if (B * p.Hkv * n_blocks > 0) {
    auto dkdv_kernel = attn_bwd_dkdv_mma_kernel<DP, kBf16>;
    set_smem(dkdv_kernel, kSmem);
    dkdv_kernel<<<static_cast<unsigned>(B * p.Hkv * n_blocks), kThreads, kSmem, stream>>>(p, n_blocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <bool kBf16>
void launch_bwd_dim(const BwdParams& p, int64_t B, cudaStream_t stream) {
  if (p.D <= 64) {
    launch_bwd<64, kBf16>(p, B, stream);
  } else {
    launch_bwd<128, kBf16>(p, B, stream);
  }
}

}  // namespace

bool attention_bwd_mma_launch(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& out, const at::Tensor& lse, const at::Tensor* mask,
                              const AttentionArgs& args, const at::Tensor& delta, const at::Tensor& dq,
                              const at::Tensor& dk, const at::Tensor& dv) {
  const auto dtype = q.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (args.dropout) return false;
  const int64_t D = q.size(3);
  if (v.size(3) != D || D < 1 || D > 128) return false;
  if (!dq.is_contiguous() || !dk.is_contiguous() || !dv.is_contiguous() || !lse.is_contiguous() ||
      !delta.is_contiguous()) {
    return false;
  }
  int dev = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  if (major < 8) return false;  // mma.sync m16n8k16 with bf16, ldmatrix, cp.async: sm80+
  // All instantiations of this file share its arch flags: one stands for them (attention_mma.cuh).
  if (!mma_image_ok(reinterpret_cast<const void*>(&attn_bwd_dq_mma_kernel<64, false>))) return false;

  const int64_t B = q.size(0);
  const int64_t m_blocks = (q.size(2) + kBlockRows - 1) / kBlockRows;
  const int64_t n_blocks = (k.size(2) + kBlockRows - 1) / kBlockRows;
  if (B * q.size(1) * m_blocks > 0x7fffffff || B * k.size(1) * n_blocks > 0x7fffffff ||
      (B * q.size(1) * q.size(2) + kWarps - 1) / kWarps > 0x7fffffff) {
    return false;
  }

  BwdParams p{};
  p.q = static_cast<const uint16_t*>(q.data_ptr());
  p.k = static_cast<const uint16_t*>(k.data_ptr());
  p.v = static_cast<const uint16_t*>(v.data_ptr());
  p.mask = mask != nullptr ? static_cast<const uint16_t*>(mask->data_ptr()) : nullptr;
  p.dout = static_cast<const uint16_t*>(dout.data_ptr());
  p.out = static_cast<const uint16_t*>(out.data_ptr());
  p.lse = static_cast<const float*>(lse.data_ptr());
  p.delta = static_cast<float*>(delta.data_ptr());
  p.dq = static_cast<uint16_t*>(dq.data_ptr());
  p.dk = static_cast<uint16_t*>(dk.data_ptr());
  p.dv = static_cast<uint16_t*>(dv.data_ptr());
  p.H = q.size(1), p.Hkv = k.size(1), p.Sq = q.size(2), p.Sk = k.size(2), p.group = p.H / p.Hkv;
  p.qb = q.stride(0), p.qh = q.stride(1), p.qs = q.stride(2);
  p.kb = k.stride(0), p.kh = k.stride(1), p.ks = k.stride(2);
  p.vb = v.stride(0), p.vh = v.stride(1), p.vs = v.stride(2);
  p.gb = dout.stride(0), p.gh = dout.stride(1), p.gs = dout.stride(2);
  p.ob = out.stride(0), p.oh = out.stride(1), p.os = out.stride(2);
  if (mask != nullptr) p.mb = mask->stride(0), p.mh = mask->stride(1), p.mq = mask->stride(2), p.mk = mask->stride(3);
  p.D = static_cast<int>(D);
  p.scale = args.scale;
  p.causal = args.causal;
  p.vec = D % 8 == 0 && aligned16(q) && aligned16(k) && aligned16(v) && aligned16(dout);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (dtype == at::kBFloat16) {
    launch_bwd_dim<true>(p, B, stream);
  } else {
    launch_bwd_dim<false>(p, B, stream);
  }
  return true;
}

}  // namespace fastlm::cuda
