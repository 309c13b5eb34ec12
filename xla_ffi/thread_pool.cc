#include "thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <chrono>

namespace fiddler {
namespace {

inline void CpuRelax() { __asm__ volatile("pause" ::: "memory"); }

inline int64_t NowUs() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

ThreadPool::ThreadPool(int nthreads, const std::vector<int>& cpu_ids, int spin_us)
    : nthreads_(nthreads < 1 ? 1 : nthreads), spin_us_(spin_us < 0 ? 0 : spin_us) {
  workers_.reserve(nthreads_ - 1);
  for (int tid = 1; tid < nthreads_; ++tid) {
    int cpu = tid < static_cast<int>(cpu_ids.size()) ? cpu_ids[tid] : -1;
    workers_.emplace_back([this, tid, cpu] { WorkerLoop(tid, cpu); });
  }
}

ThreadPool::~ThreadPool() {
  stop_.store(true);
  {
    std::lock_guard<std::mutex> lock(mu_);
    generation_.fetch_add(1);
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::Run(Fn fn, void* ctx) {
  if (nthreads_ == 1) {
    fn(ctx, 0, 1);
    return;
  }
  fn_ = fn;
  ctx_ = ctx;
  pending_.store(nthreads_ - 1);
  generation_.fetch_add(1);  // seq_cst: pairs with the sleepers_ increment in WorkerLoop
  if (sleepers_.load() > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    cv_.notify_all();
  }
  fn(ctx, 0, nthreads_);
  uint32_t spins = 0;
  while (pending_.load(std::memory_order_acquire) != 0) {
    CpuRelax();
    if (++spins > (1u << 16)) std::this_thread::yield();
  }
}

void ThreadPool::WorkerLoop(int tid, int cpu_id) {
  if (cpu_id >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu_id, &set);
    pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
  }
  uint64_t seen = 0;
  for (;;) {
    // Spin for a while, then sleep until the generation moves.
    if (generation_.load(std::memory_order_acquire) == seen) {
      int64_t start = NowUs();
      uint32_t i = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        CpuRelax();
        if ((++i & 255) == 0 && NowUs() - start > spin_us_) break;
      }
      if (generation_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        sleepers_.fetch_add(1);  // seq_cst, before re-reading generation_ under the lock
        cv_.wait(lock, [&] { return generation_.load() != seen; });
        sleepers_.fetch_sub(1);
      }
    }
    seen = generation_.load(std::memory_order_acquire);
    if (stop_.load()) return;
    fn_(ctx_, tid, nthreads_);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

}  // namespace fiddler
