// parallel_range(begin, end, grain, f): the thread pool of the decode-path CPU kernels.
//
// Why not at::parallel_for: (1) ATen's OpenMP backend is a header template around
// `#pragma omp parallel`, and without -fopenmp the pragma is dropped: it runs on one thread;
// (2) a decode step makes ~50 short parallel calls (50-500 us each), and a fork-join team that
// must wait for every thread to arrive stalls a whole scheduler tick whenever another process holds
// a core (measured: 20x slower steps on a busy 2-core machine).
// Here the range is cut into chunks that threads claim from one atomic counter; the caller works
// too, and returns once every *claimed* chunk is done: a worker that was not scheduled in time never
// delays anyone (the caller just does its chunks). Workers spin briefly, then sleep on the counter
// (C++20 atomic wait). The claim counter packs (generation, index) so a late worker can never claim
// a chunk of a later call.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace fastlm::cpu {

class ChunkPool {
 public:
  // True on a pool worker and on a caller inside run(): a nested parallel_range runs serially.
  static bool& inside() {
    static thread_local bool flag = false;
    return flag;
  }

  static ChunkPool& get() {
    static ChunkPool* pool = new ChunkPool();  // never destroyed: workers may outlive static teardown
    return *pool;
  }

  // Runs fn(chunk) for chunk in [0, n) on the caller and the workers; returns when all are done.
  template <class F>
  void run(int64_t n, const F& fn) {
    ensure_workers(at::get_num_threads() - 1);
    if (n <= 1 || workers_ == 0) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    std::lock_guard<std::mutex> guard(call_mutex_);  // one call at a time (concurrent callers queue)
    struct Inside {
      Inside() { inside() = true; }
      ~Inside() { inside() = false; }
    } inside_guard;
    const uint64_t gen = (next_.load(std::memory_order_relaxed) >> 32) + 1;
    fn_ = &trampoline<F>;
    ctx_ = &fn;
    n_ = n;
    done_.store(0, std::memory_order_relaxed);
    next_.store(gen << 32, std::memory_order_release);  // publish: (generation, index 0)
    next_.notify_all();
    int64_t mine = 0;
    int64_t i;
    while ((i = claim(gen)) >= 0) {
      fn(i);
      ++mine;
    }
    done_.fetch_add(mine, std::memory_order_acq_rel);
    // every chunk is claimed; wait only for the ones a worker is running
    for (int spin = 0; done_.load(std::memory_order_acquire) < n; ++spin) {
      if (spin > 2000) std::this_thread::yield();  // the worker was preempted mid-chunk
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    }
  }

 private:
  using Tramp = void (*)(const void*, int64_t);
  template <class F>
  static void trampoline(const void* ctx, int64_t i) {
    (*static_cast<const F*>(ctx))(i);
  }

  // The next chunk of generation gen, or -1 when none is left (or a later call has started).
  int64_t claim(uint64_t gen) {
    uint64_t v = next_.load(std::memory_order_acquire);
    while (true) {
      if ((v >> 32) != gen) return -1;
      const int64_t idx = static_cast<int64_t>(v & 0xffffffffu);
      if (idx >= n_.load(std::memory_order_relaxed)) return -1;
      if (next_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_acquire)) return idx;
    }
  }

  void worker() {
    inside() = true;
    uint64_t seen = 0;
    while (true) {
      uint64_t v = next_.load(std::memory_order_acquire);
      for (int spin = 0; (v >> 32) == (seen >> 32) && spin < 2000; ++spin) {  // ~10-50 us: long spins steal the core from the caller when the machine is busy
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
        v = next_.load(std::memory_order_acquire);
      }
      if ((v >> 32) == (seen >> 32)) {
        next_.wait(v, std::memory_order_acquire);
        continue;
      }
      seen = v;
      const uint64_t gen = v >> 32;
      int64_t mine = 0, i;
      while ((i = claim(gen)) >= 0) {
        // claimed chunk i of call `gen`: the caller waits for it, so fn_/ctx_ are still that call's
        fn_(ctx_, i);
        ++mine;
      }
      if (mine) done_.fetch_add(mine, std::memory_order_acq_rel);
    }
  }

  void ensure_workers(int want) {
    if (want <= workers_) return;
    std::lock_guard<std::mutex> guard(start_mutex_);
    while (workers_ < want && workers_ < 64) {
      std::thread([this] { worker(); }).detach();
      ++workers_;
    }
  }

  std::atomic<uint64_t> next_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int64_t> n_{0};
  Tramp fn_ = nullptr;
  const void* ctx_ = nullptr;
  int workers_ = 0;
  std::mutex call_mutex_, start_mutex_;
};

// f(begin, end) over [begin, end) cut into chunks of at least `grain` (about 16 per thread: small
// chunks bound the time the caller can wait on a worker preempted mid-chunk).
template <class F>
inline void parallel_range(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (threads == 1 || n <= grain || at::in_parallel_region() || ChunkPool::inside()) {
    f(begin, end);
    return;
  }
  const int64_t chunk = std::max<int64_t>(std::max<int64_t>(grain, 1), (n + 16 * threads - 1) / (16 * threads));
  const int64_t chunks = (n + chunk - 1) / chunk;
  ChunkPool::get().run(chunks, [&](int64_t c) {
    const int64_t b = begin + c * chunk;
    f(b, std::min(end, b + chunk));
  });
}

}  // namespace fastlm::cpu
