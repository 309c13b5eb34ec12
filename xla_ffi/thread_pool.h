// A persistent fork-join thread pool: Run(fn, ctx) calls fn(ctx, tid, n) for tid in [0, n) -- the caller runs
// tid 0 -- and returns once all have finished. Workers spin briefly after each job (back-to-back phases of one
// call see no wake-up latency), then sleep on a condition variable. No allocation per Run.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace fiddler {

class ThreadPool {
 public:
  using Fn = void (*)(void* ctx, int tid, int nthreads);

  // nthreads >= 1 (the caller counts as one). pin: bind worker i to cpu_ids[i] when cpu_ids has that many.
  ThreadPool(int nthreads, const std::vector<int>& cpu_ids, int spin_us);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return nthreads_; }
  // Not reentrant: callers serialise (the kernel runtime holds its mutex around every call).
  void Run(Fn fn, void* ctx);

 private:
  void WorkerLoop(int tid, int cpu_id);

  const int nthreads_;
  const int spin_us_;
  std::vector<std::thread> workers_;
  Fn fn_ = nullptr;
  void* ctx_ = nullptr;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable cv_;
};

}  // namespace fiddler
