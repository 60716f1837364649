// parallel_range(begin, end, grain, f): how the decode-path CPU kernels (linear, decode_attention)
// split their work over threads: at::parallel_for (OpenMP; the extension is built with -fopenmp).
//
// A custom spin-then-sleep thread pool used to live here, written while the extension was built
// without -fopenmp (at::parallel_for then ran on one thread). Measured since, interleaved in one
// process on this 2-core machine under load 3-5 (other processes busy): GPT-2 small decode step
// 13.7 ms (OpenMP) vs 16.8 ms (pool) at batch 1, 21.6 vs 32.8 ms at batch 8 (best of 20). A second
// pool competes for the cores with OpenMP's own team (which torch's ops use between our kernels),
// so there is one mechanism now.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace fastlm::cpu {

// f(b, e) over [begin, end) in at most one chunk per thread, each of at least `grain` items (serial
// when the range is at most one grain, or inside another parallel region).
template <class F>
inline void parallel_range(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (end <= begin) return;
  at::parallel_for(begin, end, std::max<int64_t>(grain, 1), f);
}

}  // namespace fastlm::cpu
