// A persistent fork-join thread pool: Run(fn, ctx) calls fn(ctx, slot, n) once for every slot in [0, n) and
// returns when all have finished. The slots are claimed from a counter by whoever is there -- the caller and
// the workers that are awake -- so a worker that is asleep, or whose core is busy with another process's
// thread (the engine's Python and XLA threads share the cores), delays nothing: the others run its slots. A
// worker that wakes late joins the job still open, or none. Workers spin after each job (for SetIdleSpin's
// microseconds, which a caller may set per job), then sleep on a futex (Linux): no mutex, so woken workers do not
// queue behind each other. Run wakes one sleeper and the
// first worker that wakes wakes the rest, so the caller starts its own share at once. Wake() does the same
// ahead of a job: a kernel call issues it on entry, so its workers come out of sleep while the caller prepares
// the call. No allocation per Run.
//
// `wait_all` is the other contract, for comparison: Run also waits until every worker has joined the job (so
// one descheduled worker delays every job by its wake-up).
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace fiddler {

class ThreadPool {
 public:
  using Fn = void (*)(void* ctx, int slot, int nslots);

  // nthreads >= 1 (the caller counts as one); n slots per Run. pin: bind worker i to cpu_ids[i] when cpu_ids has
  // that many. Throws std::system_error (or std::bad_alloc) when a worker cannot start, after joining the workers
  // it started; the kernel runtime turns that into an error return.
  ThreadPool(int nthreads, const std::vector<int>& cpu_ids, int spin_us, bool wait_all = false);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return nthreads_; }
  // Not reentrant: callers serialise (the kernel runtime holds its mutex around every call).
  void Run(Fn fn, void* ctx);
  // Starts waking sleeping workers (they spin for the next job, then sleep again); cheap when none sleeps.
  void Wake();
  // How long workers spin after the next job before they sleep (microseconds; the constructor's spin until set):
  // a caller that knows its next job comes soon keeps them hot.
  void SetIdleSpin(int spin_us) { idle_spin_us_.store(spin_us < 0 ? 0 : spin_us, std::memory_order_relaxed); }

 private:
  void WorkerLoop(int cpu_id);
  void StopAndJoin();
  void ClaimSlots();
  void WakeSleepers(int count);
  void WakeOne();

  const int nthreads_;
  const bool wait_all_;
  std::atomic<int> idle_spin_us_;
  std::vector<std::thread> workers_;
  Fn fn_ = nullptr;
  void* ctx_ = nullptr;
  uint64_t generation_ = 0;          // caller-only: jobs run so far
  std::atomic<uint64_t> job_{0};     // 2 * generation + 1 while that job is open, 2 * generation once closed
  alignas(64) std::atomic<int> next_slot_{0};    // the next unclaimed slot of the open job
  alignas(64) std::atomic<int> done_slots_{0};   // slots of the open job that have finished
  alignas(64) std::atomic<int> active_{0};       // workers between their entry check and their exit
  std::atomic<int> joined_{0};                   // workers that joined the open job (wait_all only)
  alignas(64) std::atomic<uint32_t> wake_seq_{0};  // the futex word: bumped by every wake
  std::atomic<int> sleepers_{0};                 // workers in (or about to enter) the futex wait
  std::atomic<bool> pass_on_{false};             // set by WakeOne: the first worker back wakes the others
  std::atomic<bool> stop_{false};
};

}  // namespace fiddler
