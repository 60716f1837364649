// parallel_range(begin, end, grain, f): at::parallel_for, made to work when the extension is built
// without -fopenmp. ATen's OpenMP backend is a header template around `#pragma omp parallel`; without
// -fopenmp the pragma is dropped and at::parallel_for silently runs on one thread. Here, in that
// case, the same thing the pragma compiles to is called directly: libgomp's GOMP_parallel, from the
// OpenMP runtime that libtorch_cpu already loaded (Linux + GCC/Clang builds of torch use libgomp).
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if !defined(_OPENMP) && defined(__linux__) && AT_PARALLEL_OPENMP
#define FASTLM_DIRECT_GOMP 1
extern "C" void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
extern "C" int omp_get_thread_num(void);
#endif

namespace fastlm::cpu {

template <class F>
inline void parallel_range(int64_t begin, int64_t end, int64_t grain, const F& f) {
#ifdef FASTLM_DIRECT_GOMP
  const int64_t n = end - begin;
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  int64_t nt = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain);
  if (nt <= 1 || at::in_parallel_region()) {
    f(begin, end);
    return;
  }
  struct Ctx {
    const F* f;
    int64_t begin, end, nt;
  } ctx{&f, begin, end, nt};
  GOMP_parallel(
      [](void* p) {
        const Ctx* c = static_cast<const Ctx*>(p);
        const int64_t t = omp_get_thread_num();
        const int64_t chunk = (c->end - c->begin + c->nt - 1) / c->nt;
        const int64_t b = c->begin + t * chunk, e = std::min(c->end, b + chunk);
        if (b < e) (*c->f)(b, e);
      },
      &ctx, static_cast<unsigned>(nt), 0);
#else
  at::parallel_for(begin, end, grain, f);
#endif
}

}  // namespace fastlm::cpu
