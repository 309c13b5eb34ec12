#include "thread_pool.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <climits>

namespace fiddler {
namespace {

inline void CpuRelax() { __asm__ volatile("pause" ::: "memory"); }

inline int64_t NowUs() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Spins until pred() holds, yielding the core now and then (a waiter must not starve the thread it waits for).
template <typename Pred>
inline void SpinUntil(Pred pred) {
  uint32_t spins = 0;
  while (!pred()) {
    CpuRelax();
    if (++spins > (1u << 16)) std::this_thread::yield();
  }
}

inline bool IsOpen(uint64_t job) { return (job & 1) != 0; }

// std::atomic<uint32_t> is a plain 32-bit word (lock-free, same size), which is what the futex calls take.
static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex word");

inline void FutexWait(std::atomic<uint32_t>* word, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}

inline void FutexWake(std::atomic<uint32_t>* word, int count) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, count, nullptr, nullptr, 0);
}

}  // namespace

ThreadPool::ThreadPool(int nthreads, const std::vector<int>& cpu_ids, int spin_us, bool wait_all)
    : nthreads_(nthreads < 1 ? 1 : nthreads), wait_all_(wait_all), idle_spin_us_(spin_us < 0 ? 0 : spin_us) {
  // A thread that cannot start (std::system_error: the process or user thread limit, no memory for its stack)
  // must not leave joinable threads behind (their destructors would call std::terminate): stop and join the ones
  // started, then let the caller turn the exception into an error return.
  try {
    workers_.reserve(nthreads_ - 1);
    for (int tid = 1; tid < nthreads_; ++tid) {
      int cpu = tid < static_cast<int>(cpu_ids.size()) ? cpu_ids[tid] : -1;
      workers_.emplace_back([this, cpu] { WorkerLoop(cpu); });
    }
  } catch (...) {
    StopAndJoin();
    throw;
  }
}

ThreadPool::~ThreadPool() { StopAndJoin(); }

void ThreadPool::StopAndJoin() {
  stop_.store(true);
  WakeSleepers(INT_MAX);
  for (auto& t : workers_) t.join();
  workers_.clear();
}

// Bumps the futex word (a worker about to sleep that read the old value returns at once) and wakes up to `count`
// workers sleeping on it.
void ThreadPool::WakeSleepers(int count) {
  wake_seq_.fetch_add(1);  // seq_cst
  FutexWake(&wake_seq_, count);
}

// Wakes one sleeper, which wakes the rest (pass_on_): the caller makes one cheap syscall and goes on.
void ThreadPool::WakeOne() {
  pass_on_.store(true);
  WakeSleepers(1);
}

void ThreadPool::Wake() {
  if (nthreads_ > 1 && sleepers_.load() > 0) WakeOne();
}

// Runs unclaimed slots of the open job until none is left. Called by the caller, and by a worker only after it
// counted itself in active_ and then saw the job open (so fn_/ctx_ are the open job's and stay valid).
void ThreadPool::ClaimSlots() {
  Fn fn = fn_;
  void* ctx = ctx_;
  for (int s = next_slot_.fetch_add(1); s < nthreads_; s = next_slot_.fetch_add(1)) {
    fn(ctx, s, nthreads_);
    done_slots_.fetch_add(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::Run(Fn fn, void* ctx) {
  if (nthreads_ == 1) {
    fn(ctx, 0, 1);
    return;
  }
  // The previous job is closed and no worker is inside it (active_ was 0), so nobody reads these now.
  fn_ = fn;
  ctx_ = ctx;
  next_slot_.store(0, std::memory_order_relaxed);
  done_slots_.store(0, std::memory_order_relaxed);
  joined_.store(0, std::memory_order_relaxed);
  ++generation_;
  job_.store(2 * generation_ + 1);  // seq_cst: publishes the job; pairs with the sleepers_ increment below
  if (sleepers_.load() > 0) WakeOne();
  ClaimSlots();
  SpinUntil([&] { return done_slots_.load(std::memory_order_acquire) == nthreads_; });
  if (wait_all_) SpinUntil([&] { return joined_.load(std::memory_order_acquire) == nthreads_ - 1; });
  job_.store(2 * generation_);  // closed: a worker that checks now stays out
  SpinUntil([&] { return active_.load() == 0; });  // and the ones that got in have left
}

void ThreadPool::WorkerLoop(int cpu_id) {
  if (cpu_id >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu_id, &set);
    pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
  }
  uint64_t seen = 0;  // the last job this worker joined (or found closed)
  auto ready = [&] {
    const uint64_t j = job_.load(std::memory_order_acquire);
    return stop_.load(std::memory_order_relaxed) || (j != seen && IsOpen(j));
  };
  for (;;) {
    if (!ready()) {
      // Spin for a while, then sleep until a wake-up; after one, spin again (a job follows a Wake() shortly).
      const int64_t start = NowUs();
      const int spin_us = idle_spin_us_.load(std::memory_order_relaxed);
      uint32_t i = 0;
      while (!ready()) {
        CpuRelax();
        if ((++i & 255) == 0 && NowUs() - start > spin_us) break;
      }
      if (!ready()) {
        // No lost wake-up: a waker bumps wake_seq_ after publishing its job (or stop_) and then reads sleepers_
        // (all seq_cst). Either it sees us counted and wakes a sleeper after the bump -- our wait, on the value
        // read before it, returns at once or is woken (or the worker it wakes wakes us) -- or we were counted
        // after its read, and then we see the job (or stop_) below and do not wait.
        sleepers_.fetch_add(1);
        const uint32_t w = wake_seq_.load();
        if (!ready()) FutexWait(&wake_seq_, w);
        sleepers_.fetch_sub(1);
        // The first worker back from a WakeOne() wakes the others.
        if (pass_on_.load(std::memory_order_relaxed) && pass_on_.exchange(false)) WakeSleepers(INT_MAX);
        continue;
      }
    }
    if (stop_.load()) return;
    active_.fetch_add(1);  // seq_cst: either Run's close comes later and waits for us, or we see it closed
    const uint64_t j = job_.load();
    if (IsOpen(j)) {
      if (wait_all_) joined_.fetch_add(1, std::memory_order_acq_rel);
      ClaimSlots();
    }
    active_.fetch_sub(1);
    seen = j;
  }
}

}  // namespace fiddler
