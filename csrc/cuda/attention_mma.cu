// Tensor-core flash-attention forward for fp16/bf16 (sm80+): FlashAttention-2 tiling (Dao 2023,
// https://arxiv.org/abs/2307.08691) with inline-PTX mma.sync.m16n8k16 and ldmatrix, fp32 accumulation
// and an fp32 online softmax. Same contract as attn_fwd_kernel in attention.cu: out (input dtype) and
// lse (fp32, natural log; -inf and zero output for a row that sees no key), additive mask of the input
// dtype read through its strides, causal top-left aligned (key j visible to query i iff j <= i), GQA.
// attention_fwd_mma_launch returns false for anything outside its scope (fp32, dropout, Dv != D,
// D > 256, pre-sm80 devices) and attention_cuda.cpp then runs the simple kernel instead.
// Gated by FASTLM_CUDA_ATTENTION_MMA=1 (attention_cuda.cpp): not yet run on a GPU; compile-checked
// only. scripts/gpu_check.sh runs the CUDA attention tests with it on. The fp16/bf16 mma, ldmatrix,
// cp.async and tile-loading helpers live in attention_mma.cuh, shared with the backward
// (attention_mma_bwd.cu).
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16", 16-bit types), with
// g = lane / 4 and t = lane % 4:
//   A (16x16, row-major)  reg0: (row g,   k 2t..2t+1)  reg1: (row g+8, k 2t..2t+1)
//                         reg2: (row g,   k 2t+8..+9)  reg3: (row g+8, k 2t+8..+9)
//   B (16x8, "col")       reg0: (k 2t..2t+1, col g)    reg1: (k 2t+8..2t+9, col g)
//   C/D (16x8, fp32)      c0, c1: (row g, col 2t, 2t+1)      c2, c3: (row g+8, col 2t, 2t+1)
// In every register the lower 16 bits hold the element with the lower column (or k) index.
// ldmatrix.x4 loads four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i and
// every lane receives, in register i, (row g, cols 2t..2t+1) of matrix i (with .trans: rows 2t..2t+1
// of col g, i.e. the transposed matrix's fragment). So:
//   - Q (A of S = Q K^T): matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
//     (rows 8-15, k 8-15) of the 16x16 block are exactly reg0..reg3;
//   - K (B of S): K is stored key-major (row = key = column of S), so the non-transposed 8x8 block
//     (keys n..n+7, dims k..k+7) is the B register (k 2t.., col g);
//   - V (B of O = P V): V is stored key-major too but here the key is the k index, so .trans;
//   - P (A of P V): the S accumulators of two adjacent 8-key tiles, (c0, c1) and (c2, c3), are the
//     A registers reg0/reg1 (first tile) and reg2/reg3 (second tile) once packed to 16 bits.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/attention.h"
#include "cuda/attention_mma.cuh"

namespace fastlm::cuda {
namespace {

using namespace mma;  // NOLINT: the shared tensor-core helpers (attention_mma.cuh)

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = 16 * kWarps;  // query rows per block: 16 per warp
// Keys per K/V tile: 64, or 32 for head dims padded to 256 (there the 16 x 256 fp32 O accumulators take
// 128 registers per lane and a 64-key S tile would push ptxas past 255 registers into spills).
template <int DP>
constexpr int block_n() {
  return DP > 128 ? 32 : 64;
}
struct MmaParams {
  const uint16_t* q;     // (B, H, Sq, D), raw fp16/bf16 bits, last dim contiguous
  const uint16_t* k;     // (B, Hkv, Sk, D)
  const uint16_t* v;     // (B, Hkv, Sk, D)
  const uint16_t* mask;  // additive (B, H, Sq, Sk) any strides, or nullptr
  uint16_t* out;         // (B, H, Sq, D) contiguous
  float* lse;            // (B, H, Sq) contiguous
  int64_t H, Sq, Sk, group, m_blocks;
  int64_t qb, qh, qs, kb, kh, ks, vb, vh, vs;
  int64_t mb, mh, mq, mk;
  int D;
  float scale;
  bool causal;
  bool vec;  // q, k, v rows can be read as aligned 16-byte chunks (cp.async); else element by element
};

// Tiling: one block of 4 warps per (b, h, 64-row query tile); warp w owns query rows
// [m0 + 16 w, m0 + 16 w + 16) for the whole kernel. The block streams N-key K/V tiles (N = 64, or 32
// when DP = 256) of its kv head through shared memory (Q: 64 x DP, K and V: N x DP each, rows padded
// by 16 bytes). Per key tile, each warp computes its 16 x N S = Q K^T with mma (k-steps past D
// skipped), applies scale, mask, causal and key bounds, updates the running row max m / sum l (fp32,
// quad shuffles: the 4 lanes of a quad share a row), rescales its 16 x DP fp32 O accumulators, and
// adds P V with P converted to the input dtype (dim tiles past D skipped).
// Pipeline (cp.async, one buffer each): K_t is waited for at the top of iteration t, then V_t is
// issued and overlaps the S mma; V_t is waited for after S, then K_{t+1} is issued and overlaps the
// softmax and the P V mma. Each __syncthreads also guarantees no warp still reads the buffer the
// next copy overwrites. Causal: key tiles past the block's last row are not visited, and a warp skips
// the compute of a tile that lies wholly above its own rows (all of its P would be 0).
template <int DP, bool kBf16>
__global__ void __launch_bounds__(kThreads) attn_fwd_mma_kernel(MmaParams p) {
  using Dt = Dtype<kBf16>;
  constexpr int kBlockN = block_n<DP>();
  constexpr int kStride = DP + kSmemPad;
  constexpr int kNTiles = kBlockN / 8;  // 8-key accumulator tiles of S
  constexpr int kDTiles = DP / 8;       // 8-dim accumulator tiles of O
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sQ = smem;
  uint16_t* sK = sQ + kBlockM * kStride;
  uint16_t* sV = sK + kBlockN * kStride;

  const int64_t bh = blockIdx.x / p.m_blocks;
  // Reverse the query-tile order inside a head: with causal masking the last tiles do the most work,
  // so they start first.
  const int64_t m_blk = p.m_blocks - 1 - static_cast<int64_t>(blockIdx.x % p.m_blocks);
  const int64_t b = bh / p.H, h = bh % p.H, hk = h / p.group;
  const int64_t m0 = m_blk * kBlockM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int64_t warp_row0 = m0 + 16 * warp;
  const int64_t rows[2] = {warp_row0 + g, warp_row0 + g + 8};  // the two query rows this lane holds
  const bool warp_live = warp_row0 < p.Sq;

  const uint16_t* qbase = p.q + b * p.qb + h * p.qh;
  const uint16_t* kbase = p.k + b * p.kb + hk * p.kh;
  const uint16_t* vbase = p.v + b * p.vb + hk * p.vh;
  const uint16_t* mbase = p.mask != nullptr ? p.mask + b * p.mb + h * p.mh : nullptr;

  // Keys [0, kend) can be visible to some row of this block.
  const int64_t kend = p.causal ? min(p.Sk, min(p.Sq, m0 + kBlockM)) : p.Sk;
  const int64_t n_tiles = (kend + kBlockN - 1) / kBlockN;

  load_tile<DP, kBlockM, kThreads>(sQ, qbase, p.qs, m0, p.Sq, p.D, p.vec);
  if (n_tiles > 0) load_tile<DP, kBlockN, kThreads>(sK, kbase, p.ks, 0, p.Sk, p.D, p.vec);
  cp_async_commit();

  // ldmatrix row addresses of this lane (bytes), see the layout notes at the top of the file.
  const uint32_t q_addr = smem_addr(sQ + (16 * warp + lane % 16) * kStride + (lane / 16) * 8);
  const uint32_t k_addr = smem_addr(sK + ((lane / 16) * 8 + lane % 8) * kStride + ((lane / 8) % 2) * 8);
  const uint32_t v_addr = smem_addr(sV + (((lane / 8) % 2) * 8 + lane % 8) * kStride + (lane / 16) * 8);

  float o[kDTiles][4];
#pragma unroll
  for (int d = 0; d < kDTiles; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float row_max[2] = {neg_inf(), neg_inf()};  // natural-log units: lse = max + log(sum)
  float row_sum[2] = {0.f, 0.f};              // this lane's partial sums (its 2 columns of each 8-key tile)

  for (int64_t tile = 0; tile < n_tiles; ++tile) {
    const int64_t j0 = tile * kBlockN;
    cp_async_wait_all();
    __syncthreads();  // K_tile (and Q) landed for every thread; every warp is done with V_{tile-1}
    load_tile<DP, kBlockN, kThreads>(sV, vbase, p.vs, j0, p.Sk, p.D, p.vec);
    cp_async_commit();
    // Warp-uniform: rows past Sq, or (causal) a tile whose first key is after the warp's last row.
    const bool active = warp_live && !(p.causal && j0 > warp_row0 + 15);

    float s[kNTiles][4];
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    if (active) {
#pragma unroll
      for (int kk = 0; kk < DP / 16; ++kk) {
        if (kk * 16 < p.D) {  // k-steps wholly inside the zero padding of D add nothing
          uint32_t a[4];
          ldsm_x4(a, q_addr + kk * 16 * 2);
#pragma unroll
          for (int n2 = 0; n2 < kBlockN / 16; ++n2) {
            uint32_t bk[4];
            ldsm_x4(bk, k_addr + (n2 * 16 * kStride + kk * 16) * 2);
            Dt::mma(s[2 * n2], a, bk[0], bk[1]);
            Dt::mma(s[2 * n2 + 1], a, bk[2], bk[3]);
          }
        }
      }
    }

    cp_async_wait_all();
    __syncthreads();  // V_tile landed; every warp is done reading sK
    if (tile + 1 < n_tiles) load_tile<DP, kBlockN, kThreads>(sK, kbase, p.ks, j0 + kBlockN, p.Sk, p.D, p.vec);
    cp_async_commit();
    if (!active) continue;

    // Scores in natural-log units: s = (q . k) * scale + mask, -inf outside the keys or past the
    // causal diagonal. Why not fold scale * log2e into one FMA: a bf16 mask at finfo.min (-3.4e38)
    // times log2e overflows to -inf, which would turn "every key at finfo.min" (a uniform softmax,
    // as torch and the simple kernel compute it) into a fully masked row; and lse must be
    // max + log(sum) in natural units for the backward. So exp2 takes (s - max) * log2e.
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t i = rows[e / 2];
        const int64_t j = j0 + n * 8 + 2 * t4 + (e % 2);
        float x = s[n][e] * p.scale;
        if (j >= p.Sk || (p.causal && j > i)) {
          x = neg_inf();
        } else if (mbase != nullptr && i < p.Sq) {
          x += Dt::to_float(mbase[i * p.mq + j * p.mk]);
        }
        s[n][e] = x;
      }
    }

    // Online softmax per row (r = 0: row g, registers 0-1; r = 1: row g + 8, registers 2-3).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = neg_inf();
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the quad (lanes 4g..4g+3) holds the row
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(row_max[r], mx);
      // A row with no visible key so far keeps max -inf; subtract 0 then, so exp2 gives 0, not NaN.
      const float m_use = m_new == neg_inf() ? 0.f : m_new;
      const float alpha = exp2f((row_max[r] - m_use) * kLog2e);  // 0 when the old max was -inf
      row_max[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          const float pe = exp2f((s[n][e] - m_use) * kLog2e);
          s[n][e] = pe;
          sum += pe;
        }
      }
      // fp32 sum of the unrounded p; P V below uses p rounded to the input dtype (as FA2 does).
      row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) {
        o[d][2 * r] *= alpha;
        o[d][2 * r + 1] *= alpha;
      }
    }

    // O += P V: the 16 keys of k-step kk are S tiles 2 kk and 2 kk + 1 (A fragment, see the top).
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      a[0] = Dt::pack(s[2 * kk][0], s[2 * kk][1]);
      a[1] = Dt::pack(s[2 * kk][2], s[2 * kk][3]);
      a[2] = Dt::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = Dt::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int d2 = 0; d2 < DP / 16; ++d2) {
        if (d2 * 16 < p.D) {  // output dims wholly past D are never stored
          uint32_t bv[4];
          ldsm_x4_trans(bv, v_addr + (kk * 16 * kStride + d2 * 16) * 2);
          Dt::mma(o[2 * d2], a, bv[0], bv[1]);
          Dt::mma(o[2 * d2 + 1], a, bv[2], bv[3]);
        }
      }
    }
  }
  cp_async_wait_all();  // nothing is in flight here (the last tile issues no copy); kept for safety

  // Epilogue: out = O / l (zeros for a row that saw no key), lse = max + log(l) (-inf then).
  const bool pairs = (p.D % 2) == 0;  // two adjacent outputs form one aligned 32-bit store
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int64_t i = rows[r];
    if (i >= p.Sq) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    uint16_t* orow = p.out + (bh * p.Sq + i) * p.D;
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      const int col = d * 8 + 2 * t4;
      const float v0 = o[d][2 * r] * inv, v1 = o[d][2 * r + 1] * inv;
      if (pairs && col + 1 < p.D) {
        *reinterpret_cast<uint32_t*>(orow + col) =
            static_cast<uint32_t>(Dt::from_float(v0)) | (static_cast<uint32_t>(Dt::from_float(v1)) << 16);
      } else {
        if (col < p.D) orow[col] = Dt::from_float(v0);
        if (col + 1 < p.D) orow[col + 1] = Dt::from_float(v1);
      }
    }
    if (t4 == 0) p.lse[bh * p.Sq + i] = l > 0.f ? row_max[r] + logf(l) : neg_inf();
  }
}

template <int DP, bool kBf16>
void launch(const MmaParams& p, int64_t blocks, cudaStream_t stream) {
  constexpr size_t kSmem = sizeof(uint16_t) * (kBlockM + 2 * block_n<DP>()) * (DP + kSmemPad);
  auto kernel = attn_fwd_mma_kernel<DP, kBf16>;
  // Above 48 KB dynamic shared memory needs an explicit opt-in (DP = 128: 51 KB, DP = 256: 66 KB).
  if (kSmem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem)));
  }
  kernel<<<static_cast<unsigned>(blocks), kThreads, kSmem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kBf16>
void launch_dim(const MmaParams& p, int64_t blocks, cudaStream_t stream) {
  if (p.D <= 64) {
    launch<64, kBf16>(p, blocks, stream);
  } else if (p.D <= 128) {
    launch<128, kBf16>(p, blocks, stream);
  } else {
    launch<256, kBf16>(p, blocks, stream);
  }
}

}  // namespace

bool attention_fwd_mma_launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* mask,
                              const AttentionArgs& args, const at::Tensor& out, const at::Tensor& lse) {
  const auto dtype = q.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (args.dropout) return false;
  const int64_t D = q.size(3);
  if (v.size(3) != D || D < 1 || D > 256) return false;
  if (!out.is_contiguous() || !lse.is_contiguous()) return false;
  int dev = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  if (major < 8) return false;  // mma.sync m16n8k16 with bf16, ldmatrix, cp.async: sm80+
  // All instantiations of this file share its arch flags: one stands for them (attention_mma.cuh).
  if (!mma_image_ok(reinterpret_cast<const void*>(&attn_fwd_mma_kernel<64, false>))) return false;

  MmaParams p{};
  p.q = static_cast<const uint16_t*>(q.data_ptr());
  p.k = static_cast<const uint16_t*>(k.data_ptr());
  p.v = static_cast<const uint16_t*>(v.data_ptr());
  p.mask = mask != nullptr ? static_cast<const uint16_t*>(mask->data_ptr()) : nullptr;
  p.out = static_cast<uint16_t*>(out.data_ptr());
  p.lse = static_cast<float*>(lse.data_ptr());
  p.H = q.size(1), p.Sq = q.size(2), p.Sk = k.size(2), p.group = q.size(1) / k.size(1);
  p.qb = q.stride(0), p.qh = q.stride(1), p.qs = q.stride(2);
  p.kb = k.stride(0), p.kh = k.stride(1), p.ks = k.stride(2);
  p.vb = v.stride(0), p.vh = v.stride(1), p.vs = v.stride(2);
  if (mask != nullptr) p.mb = mask->stride(0), p.mh = mask->stride(1), p.mq = mask->stride(2), p.mk = mask->stride(3);
  p.D = static_cast<int>(D);
  p.scale = args.scale;
  p.causal = args.causal;
  p.vec = D % 8 == 0 && aligned16(q) && aligned16(k) && aligned16(v);
  p.m_blocks = (p.Sq + kBlockM - 1) / kBlockM;
  const int64_t blocks = q.size(0) * p.H * p.m_blocks;
  if (blocks == 0) return true;  // nothing to compute (empty batch, heads or queries)
  if (blocks > 0x7fffffff) return false;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (dtype == at::kBFloat16) {
    launch_dim<true>(p, blocks, stream);
  } else {
    launch_dim<false>(p, blocks, stream);
  }
  return true;
}

}  // namespace fastlm::cuda
