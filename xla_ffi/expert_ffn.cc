// The driver: path choice, workspace, and the split of weight rows over the thread pool.
#include "expert_ffn.h"

#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "bf16_math.h"
#include "cpu_features.h"
#include "kernels.h"
#include "thread_pool.h"

namespace fiddler {

int g_prefetch_bytes = 0;

namespace {

thread_local char tl_error[512];

const char* Errorf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
const char* Errorf(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(tl_error, sizeof(tl_error), fmt, args);
  va_end(args);
  return tl_error;
}

// Grow-only, 64-byte aligned scratch memory: steady-state calls allocate nothing.
class Workspace {
 public:
  ~Workspace() { std::free(ptr_); }
  void* Get(size_t bytes) {
    if (bytes > size_) {
      std::free(ptr_);
      size_t want = bytes + bytes / 4 + 4096;
      want = (want + 63) & ~size_t{63};
      ptr_ = std::aligned_alloc(64, want);
      size_ = ptr_ ? want : 0;
    }
    return ptr_;
  }

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

int EnvInt(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  long x = std::strtol(v, &end, 10);
  return (end && *end == '\0') ? static_cast<int>(x) : fallback;
}

Path ParsePath(const char* s) {
  if (!s || !*s || !std::strcmp(s, "auto")) return Path::kAuto;
  if (!std::strcmp(s, "generic")) return Path::kGeneric;
  if (!std::strcmp(s, "avx2")) return Path::kAvx2;
  if (!std::strcmp(s, "avx512_bf16") || !std::strcmp(s, "avx512")) return Path::kAvx512Bf16;
  if (!std::strcmp(s, "amx")) return Path::kAmx;
  std::fprintf(stderr, "fiddler_jax kernels: unknown FIDDLER_KERNEL_PATH=%s, using auto\n", s);
  return Path::kAuto;
}

// The AMX/prefetch knobs' ranges, shared by the setters and the environment variables.
int ClampKc(int kc) { return kc < 0 ? 0 : (kc > 64 ? 64 : kc); }  // 0: auto
int ClampMb(int mb) { return mb < 16 ? 16 : (mb > 1024 ? 1024 : mb); }
int ClampPass(int pass) { return pass < 1 ? 1 : (pass > 64 ? 64 : pass); }
int ClampVariant(int variant) { return variant < 0 || variant > 3 ? 0 : variant; }
int ClampPrefetchBytes(int bytes) { return bytes < 0 ? 0 : bytes; }
int ClampGroupKib(int kib) { return kib < 1 ? 1 : kib; }

// The largest thread count the pool accepts: MaxThreads() = max(kMinThreadCap, kThreadsPerCpu x logical CPUs).
// More is never useful (the pool's slots are one per thread) and a count far beyond it could only fail to start
// or exhaust the process's threads.
constexpr int kThreadsPerCpu = 8;
constexpr int kMinThreadCap = 64;
constexpr int kMaxSpinUs = 1000000;

// Why a thread count is refused, or "" if it is accepted (n <= 0: one thread per physical core).
std::string CheckThreadCount(const char* what, long long n) {
  const int cap = MaxThreads();
  if (n <= cap) return "";
  char buf[400];
  std::snprintf(buf, sizeof(buf),
                "%s = %lld is more kernel threads than this machine allows (at most %d: %d per logical CPU, at "
                "least %d, and it has %d logical CPUs); use 1..%d, or 0 for one thread per physical core",
                what, n, cap, kThreadsPerCpu, kMinThreadCap, GetCpuFeatures().logical_cpus, cap);
  return buf;
}

// The pool's spin after the calls this thread makes (StreamedCallScope); < 0: the runtime's spin_us.
thread_local int t_call_spin_us = -1;

struct Runtime {
  std::mutex mu;
  std::unique_ptr<ThreadPool> pool;
  std::string config_error;  // a refused FIDDLER_KERNEL_THREADS: every call that needs the pool reports it
  std::string pool_error;    // why the last pool could not start (EnsurePool's message)
  int want_threads = 0;  // <= 0: physical cores
  bool pin = false;
  int spin_us = 50;  // bridges the phases of one call; longer spins steal the cores the engine's host work needs next
  int streamed_spin_us = -1;  // after a streamed-lane call (the next layer's comes soon); < 0: spin_us
  bool wait_all = false;  // the pool's old contract (every worker joins every phase): for comparison only
  int chunks_per_thread = 4;  // work claimed dynamically in this many chunks per thread (robust to a busy core)
  Path forced = Path::kAuto;
  int64_t amx_min_n = 8;  // measured on the device's Xeon: AMX beats AVX512_BF16 from n = 8
  // Quantised experts with at least this many tokens run dense: rows dequantised to bf16 blocks, then the bf16
  // path (AMX where present); < 0: auto (amx_min_n on an AMX CPU, else never).
  int64_t quant_dense_min_n = -1;
  Workspace ws_index, ws_data, ws_dense;

  Runtime() {
    ParseThreadsEnv();
    pin = EnvInt("FIDDLER_KERNEL_PIN", 0) != 0;
    spin_us = EnvInt("FIDDLER_KERNEL_SPIN_US", 50);
    streamed_spin_us = EnvInt("FIDDLER_KERNEL_STREAMED_SPIN_US", -1);
    if (streamed_spin_us > kMaxSpinUs) streamed_spin_us = kMaxSpinUs;
    wait_all = EnvInt("FIDDLER_KERNEL_POOL_WAIT_ALL", 0) != 0;
    chunks_per_thread = EnvInt("FIDDLER_KERNEL_CHUNKS", 4);
    if (chunks_per_thread < 1) chunks_per_thread = 1;
    amx_min_n = EnvInt("FIDDLER_AMX_MIN_N", 8);
    quant_dense_min_n = EnvInt("FIDDLER_QUANT_DENSE_MIN_N", -1);
    if (spin_us < 0) spin_us = 0;
    if (spin_us > kMaxSpinUs) spin_us = kMaxSpinUs;
    g_amx_variant = ClampVariant(EnvInt("FIDDLER_AMX_VARIANT", 0));
    g_prefetch_bytes = ClampPrefetchBytes(EnvInt("FIDDLER_KERNEL_PREFETCH", 0));
    g_amx_group_kib = ClampGroupKib(EnvInt("FIDDLER_AMX_GROUP_KIB", g_amx_group_kib));
    g_amx_kc = ClampKc(EnvInt("FIDDLER_AMX_KC", g_amx_kc));
    g_amx_mb = ClampMb(EnvInt("FIDDLER_AMX_MB", g_amx_mb));
    g_amx_pass = ClampPass(EnvInt("FIDDLER_AMX_PASS", g_amx_pass));
    g_amx_prefetch = EnvInt("FIDDLER_AMX_PREFETCH", g_amx_prefetch);
    g_amx_blocked_from = EnvInt("FIDDLER_AMX_BLOCKED_FROM", g_amx_blocked_from);
    g_amx_pipeline = EnvInt("FIDDLER_AMX_PIPELINE", g_amx_pipeline);
    Path p = ParsePath(std::getenv("FIDDLER_KERNEL_PATH"));
    if (p != Path::kAuto && !PathSupported(p)) {
      std::fprintf(stderr, "fiddler_jax kernels: FIDDLER_KERNEL_PATH=%s is not supported by this CPU, using auto\n",
                   PathName(p));
      p = Path::kAuto;
    }
    forced = p;
  }

  // FIDDLER_KERNEL_THREADS: unset, empty or <= 0 is one thread per physical core; an integer up to MaxThreads()
  // is that many; anything else is refused (config_error) until set_num_threads replaces it.
  void ParseThreadsEnv() {
    const char* v = std::getenv("FIDDLER_KERNEL_THREADS");
    if (!v || !*v) return;
    char* end = nullptr;
    errno = 0;
    const long long x = std::strtoll(v, &end, 10);
    if (!end || *end != '\0' || errno == ERANGE) {
      char buf[400];
      std::snprintf(buf, sizeof(buf),
                    "FIDDLER_KERNEL_THREADS = '%.60s' is not an integer; set it to 1..%d, or unset it (or 0) for "
                    "one thread per physical core",
                    v, MaxThreads());
      config_error = buf;
      return;
    }
    config_error = CheckThreadCount("FIDDLER_KERNEL_THREADS", x);
    if (config_error.empty()) want_threads = x > 0 ? static_cast<int>(x) : 0;
  }

  int PlannedThreads() const {
    const int n = want_threads > 0 ? want_threads : GetCpuFeatures().physical_cores;
    return n < 1 ? 1 : n;
  }

  // Starts the pool if there is none (call with mu held). nullptr when the pool runs, else why not (a refused
  // FIDDLER_KERNEL_THREADS, or a thread that could not start): the message stays valid until the next call.
  const char* EnsurePool() {
    if (pool) return nullptr;
    if (!config_error.empty()) return config_error.c_str();
    const CpuFeatures& f = GetCpuFeatures();
    const int n = PlannedThreads();
    try {
      std::vector<int> cpus;
      if (pin) {
        cpus.resize(f.logical_cpus > 0 ? f.logical_cpus : 1);
        int got = PhysicalCoreCpuIds(cpus.data(), static_cast<int>(cpus.size()));
        cpus.resize(got > 0 ? got : 0);
      }
      pool.reset(new ThreadPool(n, cpus, spin_us, wait_all));
      return nullptr;
    } catch (const std::exception& e) {  // std::system_error from std::thread, std::bad_alloc
      pool_error = "cannot start " + std::to_string(n) + " kernel threads (" + e.what() +
                   "); use fewer with FIDDLER_KERNEL_THREADS or fiddler_jax.kernels.set_num_threads";
    } catch (...) {
      pool_error = "cannot start " + std::to_string(n) + " kernel threads; use fewer with FIDDLER_KERNEL_THREADS "
                   "or fiddler_jax.kernels.set_num_threads";
    }
    pool.reset();
    return pool_error.c_str();
  }

  Path Choose(int64_t n) const {
    if (forced != Path::kAuto) return forced;
    const CpuFeatures& f = GetCpuFeatures();
    if (f.can_amx() && n >= amx_min_n) return Path::kAmx;
    if (f.can_avx512_bf16()) return Path::kAvx512Bf16;
    if (f.can_avx2()) return Path::kAvx2;
    return Path::kGeneric;
  }
};

Runtime& Rt() {
  static Runtime* rt = new Runtime();  // never destroyed: pool threads must not race static destructors
  return *rt;
}

// Rows [0, R) split into nthreads contiguous ranges, on multiples of `granule`.
inline void SplitRows(int64_t R, int64_t granule, int tid, int nthreads, int64_t* r0, int64_t* r1) {
  const int64_t blocks = (R + granule - 1) / granule;
  const int64_t b0 = blocks * tid / nthreads, b1 = blocks * (tid + 1) / nthreads;
  *r0 = b0 * granule < R ? b0 * granule : R;
  *r1 = b1 * granule < R ? b1 * granule : R;
}

inline size_t Align64(size_t b) { return (b + 63) & ~size_t{63}; }

// Whether phase 1 reads x rows starting at `rows` in place: the path can (direct_x) and they are 64-byte aligned
// (the 64-byte activation loads of a misaligned row each span two cache lines: reading misaligned rows in place
// measured 2-4% slower than packing them into the aligned workspace, at Qwen3's shape, n = 1..4, one thread).
inline bool ReadInPlace(const PathKernels* k, const uint16_t* rows) {
  return k->direct_x && (reinterpret_cast<uintptr_t>(rows) & 63) == 0;
}

bool Overflows(int64_t a, int64_t b) { return a != 0 && b > INT64_MAX / a; }

int64_t RowCost(Path p, int64_t n) {
  // Relative cost of one weight row: streaming it, plus per-token compute (cheaper per token on AMX).
  switch (p) {
    case Path::kAmx: return 64 + 2 * n;
    case Path::kAvx512Bf16: return 64 + 8 * n;
    default: return 64 + 32 * n;
  }
}

// ---------------------------------------------------------------------------------------------------------
// A call is one parallel region (one ThreadPool::Run). Its work is one list of tasks in a fixed order:
//   1. pack units: tokens [t0, t1) of a segment's activations into its packed buffer (none when a path reads
//      the segment's x rows in place);
//   2. phase-1 chunks: ffn rows [r0, r1) of a segment (h = silu(x w1^T) * (x w3^T));
//   3. phase-2 chunks: hidden rows [r0, r1) of a segment (y = h w2^T);
//   4. combine units (grouped calls): columns [c0, c1) of the output, the weighted sum of each token's
//      assignments in assignment order;
// segment by segment inside each stage. Threads claim tasks from one counter (dynamic split: a thread slowed by
// another process on its core -- the engine's Python and XLA threads share the cores -- just claims fewer). A
// task waits only for what it reads: a phase-1 chunk for its segment's packing, a phase-2 chunk for its segment's
// phase-1 chunks (all of h), a combine unit for every phase-2 chunk. Those are earlier tasks, already claimed by
// threads that are running them, so the waits always end; with several experts a segment's phase 2 finds its h
// long complete (the other segments' phase-1 chunks came between), so the only waits left are the ones the data
// imposes (one expert: phase 2 after its last phase-1 chunk; the combine after the last phase-2 chunk). Every
// output element is computed by one kernel call with a fixed operation order and the combine sums in assignment
// order, so results do not depend on the thread count or on who claimed what.

// Spins until pred() holds, yielding the core now and then (the thread being waited for may share it).
template <typename Pred>
inline void WaitUntil(Pred pred) {
  uint32_t spins = 0;
  while (!pred()) {
    __asm__ volatile("pause" ::: "memory");
    if (++spins > (1u << 12)) std::this_thread::yield();
  }
}

// One expert's share of a call (an active expert of a grouped call, or the single expert).
struct alignas(64) Segment {
  const PathKernels* k;
  const QuantKernels* qk;        // quantised weights: the path's quantised phases (null: bfloat16 weights)
  const uint16_t *w1, *w3, *w2;  // this expert's weights (bfloat16)
  QuantMatrix q1, q3, q2;        // this expert's weights (quantised)
  int64_t n;                     // tokens routed to it
  int64_t first;                 // grouped: position of its first row in the expert-sorted assignment order
  const int32_t* idx;            // tokens of x to pack (nullptr: rows 0..n-1)
  const void* x_act;             // what phase 1 reads: the packed buffer, or x's rows in place
  void* x_pack;                  // the packed buffer (nullptr: nothing to pack)
  void* h_act;
  OutView out;                   // where phase 2 writes
  int64_t cost1, cost2;          // per-row cost estimates for phase 1 / 2
  int64_t pack_rows, pack_first, pack_units;  // tokens per pack unit; its first task; how many
  int64_t rows1, first1, chunks1;             // phase 1: rows per chunk; first task; how many
  int64_t rows2, first2, chunks2;             // phase 2
  alignas(64) std::atomic<int64_t> packed{0};  // pack units finished
  std::atomic<int64_t> done1{0};               // phase-1 chunks finished
};

struct Call {
  const uint16_t* x;
  int64_t hidden, ffn;
  Segment* seg;
  int64_t nseg;
  // Task index boundaries: pack [0, end_pack), phase 1 [end_pack, end1), phase 2 [end1, end2), combine
  // [end2, ntasks).
  int64_t end_pack = 0, end1 = 0, end2 = 0, ntasks = 0;
  int64_t combine_units = 0;
  // Combine (grouped calls only).
  int64_t T = 0;
  const float* weights = nullptr;
  const int32_t* tok_off = nullptr;   // [T+1]
  const int32_t* tok_list = nullptr;  // [A] assignment ids grouped by token, original order inside a token
  const int32_t* pos = nullptr;       // [A] sorted position of each assignment
  const float* ybuf = nullptr;        // [A, hidden] fp32, expert-sorted (phase 2's output)
  void* out = nullptr;
  bool out_f32 = true;
  char* dense_ws = nullptr;  // dense quantised segments: one block area of dense_slot bytes per pool slot
  size_t dense_slot = 0;
  alignas(64) std::atomic<int64_t> next{0};   // the next unclaimed task
  alignas(64) std::atomic<int64_t> done2{0};  // phase-2 chunks finished (all segments)
};

// Combine units hold about this many output elements (x assignments): a decode step's combine is one unit.
constexpr int64_t kCombineElems = 32768;

// Lays out the task list: pack units (pack_rows tokens each, about 32768 elements of x), then each phase's
// chunks -- every segment cut into chunks of about the same cost, the phase's total cost over nthreads x
// chunks_per_thread, so an expert with many tokens gets more, smaller chunks -- then the combine units.
void PlanTasks(Call& c, int nthreads, int chunks_per_thread, int64_t combine_elems) {
  int64_t t = 0;
  for (int64_t s = 0; s < c.nseg; ++s) {
    Segment& sg = c.seg[s];
    sg.pack_first = t;
    sg.pack_rows = 1;
    sg.pack_units = 0;
    if (sg.x_pack) {
      const int64_t rows = (32768 + c.hidden - 1) / c.hidden;
      sg.pack_rows = rows < 1 ? 1 : rows;
      sg.pack_units = (sg.n + sg.pack_rows - 1) / sg.pack_rows;
    }
    t += sg.pack_units;
  }
  c.end_pack = t;
  for (int phase = 1; phase <= 2; ++phase) {
    const int64_t rows = phase == 1 ? c.ffn : c.hidden;
    long double total = 0;
    for (int64_t s = 0; s < c.nseg; ++s)
      total += static_cast<long double>(phase == 1 ? c.seg[s].cost1 : c.seg[s].cost2) * rows;
    const long double per_chunk = total / (static_cast<long double>(nthreads) * chunks_per_thread);
    for (int64_t s = 0; s < c.nseg; ++s) {
      Segment& sg = c.seg[s];
      const int64_t per_row = phase == 1 ? sg.cost1 : sg.cost2;
      const int64_t g = sg.k->row_granule > 0 ? sg.k->row_granule : 1;
      int64_t want = per_row > 0 ? static_cast<int64_t>(per_chunk / per_row) : rows;
      want = (want + g - 1) / g * g;
      const int64_t chunk = want < g ? g : (want > rows ? rows : want);
      const int64_t n = (rows + chunk - 1) / chunk;
      if (phase == 1) {
        sg.rows1 = chunk, sg.first1 = t, sg.chunks1 = n;
      } else {
        sg.rows2 = chunk, sg.first2 = t, sg.chunks2 = n;
      }
      t += n;
    }
    (phase == 1 ? c.end1 : c.end2) = t;
  }
  c.combine_units = 0;
  if (c.ybuf) {
    const int64_t elems = static_cast<int64_t>(c.tok_off[c.T]) * c.hidden;  // assignments x hidden
    int64_t units = (elems + combine_elems - 1) / combine_elems;
    units = units < 1 ? 1 : (units > nthreads ? nthreads : units);
    c.combine_units = units;
  }
  c.ntasks = t + c.combine_units;
  c.next.store(0, std::memory_order_relaxed);
  c.done2.store(0, std::memory_order_relaxed);
}

// Columns [c0, c1) of the output: out[t, i] = sum over token t's assignments a (in assignment order) of
// weights[a] * ybuf[pos[a], i].
void CombineColumns(const Call& c, int64_t c0, int64_t c1) {
  constexpr int64_t kChunk = 512;
  float acc[kChunk];
  for (int64_t t = 0; t < c.T; ++t) {
    for (int64_t cb = c0; cb < c1; cb += kChunk) {
      const int64_t ce = cb + kChunk < c1 ? cb + kChunk : c1;
      const int64_t w = ce - cb;
      for (int64_t i = 0; i < w; ++i) acc[i] = 0.f;
      for (int32_t q = c.tok_off[t]; q < c.tok_off[t + 1]; ++q) {
        const int32_t a = c.tok_list[q];
        const float wt = c.weights[a];
        const float* y = c.ybuf + static_cast<int64_t>(c.pos[a]) * c.hidden + cb;
        for (int64_t i = 0; i < w; ++i) acc[i] += wt * y[i];
      }
      if (c.out_f32) {
        float* o = static_cast<float*>(c.out) + t * c.hidden + cb;
        for (int64_t i = 0; i < w; ++i) o[i] = acc[i];
      } else {
        uint16_t* o = static_cast<uint16_t*>(c.out) + t * c.hidden + cb;
        for (int64_t i = 0; i < w; ++i) o[i] = F32ToBf16(acc[i]);
      }
    }
  }
}

// The calling pool slot's block memory (the call's dense workspace, RunTasks sets it): 2 x kDenseRows x
// max(hidden, ffn) bf16 per slot, allocated before the call so a failed allocation is an error, not a crash.
thread_local uint16_t* tl_dense_block = nullptr;

// The pool's slot function: claims tasks until none is left (module comment above).
void RunTasks(void* p, int slot, int) {
  auto* cp = static_cast<Call*>(p);
  Call& c = *cp;
  tl_dense_block = c.dense_ws ? reinterpret_cast<uint16_t*>(c.dense_ws + slot * c.dense_slot) : nullptr;
  int64_t sp = 0, s1 = 0, s2 = 0;  // segment cursors per stage: this thread's claims only grow
  for (int64_t i = c.next.fetch_add(1); i < c.ntasks; i = c.next.fetch_add(1)) {
    if (i < c.end_pack) {
      while (sp + 1 < c.nseg && c.seg[sp + 1].pack_first <= i) ++sp;
      Segment& sg = c.seg[sp];
      const int64_t t0 = (i - sg.pack_first) * sg.pack_rows;
      const int64_t t1 = t0 + sg.pack_rows < sg.n ? t0 + sg.pack_rows : sg.n;
      sg.k->pack(c.x, c.hidden, sg.idx, sg.n, t0, t1, sg.x_pack);
      sg.packed.fetch_add(1, std::memory_order_acq_rel);
    } else if (i < c.end1) {
      while (s1 + 1 < c.nseg && c.seg[s1 + 1].first1 <= i) ++s1;
      Segment& sg = c.seg[s1];
      if (sg.pack_units) WaitUntil([&] { return sg.packed.load(std::memory_order_acquire) == sg.pack_units; });
      const int64_t r0 = (i - sg.first1) * sg.rows1;
      const int64_t r1 = r0 + sg.rows1 < c.ffn ? r0 + sg.rows1 : c.ffn;
      if (sg.qk) {
        sg.qk->phase1(sg.x_act, sg.n, c.hidden, sg.q1, sg.q3, c.ffn, r0, r1, sg.h_act);
      } else {
        sg.k->phase1(sg.x_act, sg.n, c.hidden, sg.w1, sg.w3, c.ffn, r0, r1, sg.h_act);
      }
      sg.done1.fetch_add(1, std::memory_order_acq_rel);
    } else if (i < c.end2) {
      while (s2 + 1 < c.nseg && c.seg[s2 + 1].first2 <= i) ++s2;
      Segment& sg = c.seg[s2];
      WaitUntil([&] { return sg.done1.load(std::memory_order_acquire) == sg.chunks1; });
      const int64_t r0 = (i - sg.first2) * sg.rows2;
      const int64_t r1 = r0 + sg.rows2 < c.hidden ? r0 + sg.rows2 : c.hidden;
      if (sg.qk) {
        sg.qk->phase2(sg.h_act, sg.n, c.ffn, sg.q2, c.hidden, r0, r1, sg.out);
      } else {
        sg.k->phase2(sg.h_act, sg.n, c.ffn, sg.w2, c.hidden, r0, r1, sg.out);
      }
      c.done2.fetch_add(1, std::memory_order_acq_rel);
    } else {
      const int64_t chunks2 = c.end2 - c.end1;
      WaitUntil([&] { return c.done2.load(std::memory_order_acquire) == chunks2; });
      int64_t c0, c1;
      SplitRows(c.hidden, 16, static_cast<int>(i - c.end2), static_cast<int>(c.combine_units), &c0, &c1);
      if (c0 < c1) CombineColumns(c, c0, c1);
    }
  }
}

struct ProbeCall {
  const uint64_t* const* p;  // n buffers, read in turn
  const int64_t* words;
  int64_t n;
  uint64_t sums[512];
};

// One thread's slice of one buffer, read as 8 interleaved sequential streams (as the kernels do: 8 weight rows at
// once), which keeps enough cache misses in flight per core to reach the memory bandwidth.
uint64_t ReadSlice(const uint64_t* p, int64_t words, int tid, int nt) {
  int64_t w0, w1;
  SplitRows(words, 64, tid, nt, &w0, &w1);
  constexpr int kStreams = 8;
  const int64_t len = (w1 - w0) / kStreams / 8 * 8;  // words per stream, a multiple of one cache line
  uint64_t acc[kStreams] = {};
  for (int64_t i = 0; i < len; i += 8) {
    for (int s = 0; s < kStreams; ++s) {
      const uint64_t* q = p + w0 + s * len + i;
      acc[s] += q[0] ^ q[1] ^ q[2] ^ q[3] ^ q[4] ^ q[5] ^ q[6] ^ q[7];
    }
  }
  uint64_t sum = 0;
  for (int64_t i = w0 + kStreams * len; i < w1; ++i) sum += p[i];
  for (int s = 0; s < kStreams; ++s) sum += acc[s];
  return sum;
}

// Every thread reads its slice of each buffer in turn, all in one fork-join (as a grouped expert call reads its
// experts' weights): a pass over many small buffers pays the pool's start once.
void ProbeRun(void* arg, int tid, int nt) {
  auto* c = static_cast<ProbeCall*>(arg);
  uint64_t sum = 0;
  for (int64_t b = 0; b < c->n; ++b) sum += ReadSlice(c->p[b], c->words[b], tid, nt);
  c->sums[tid % 512] += sum;
}

void ZeroOut(void* y, int64_t count, bool out_f32) {
  std::memset(y, 0, static_cast<size_t>(count) * (out_f32 ? 4 : 2));
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------

bool PathSupported(Path path) {
  const CpuFeatures& f = GetCpuFeatures();
  switch (path) {
    case Path::kAuto: return true;
    case Path::kGeneric: return true;
    case Path::kAvx2: return f.can_avx2();
    case Path::kAvx512Bf16: return f.can_avx512_bf16();
    case Path::kAmx: return f.can_amx();
  }
  return false;
}

const char* PathName(Path path) {
  switch (path) {
    case Path::kAuto: return "auto";
    case Path::kGeneric: return "generic";
    case Path::kAvx2: return "avx2";
    case Path::kAvx512Bf16: return "avx512_bf16";
    case Path::kAmx: return "amx";
  }
  return "?";
}

const QuantKernels* GetQuantKernels(Path path) {
  switch (path) {
    case Path::kGeneric: return &generic::kQuantKernels;
    case Path::kAvx512Bf16: return &avx512::kQuantKernels;
    default: return nullptr;
  }
}

const PathKernels* GetPathKernels(Path path) {
  switch (path) {
    case Path::kGeneric: return &generic::kKernels;
    case Path::kAvx2: return &avx2::kKernels;
    case Path::kAvx512Bf16: return &avx512::kKernels;
    case Path::kAmx: return &amx::kKernels;
    default: return nullptr;
  }
}

bool SetForcedPath(Path path) {
  if (!PathSupported(path)) return false;
  Runtime& rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mu);
  rt.forced = path;
  return true;
}

Path GetForcedPath() {
  Runtime& rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mu);
  return rt.forced;
}

Path PathForTokens(int64_t n) {
  Runtime& rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mu);
  return rt.Choose(n);
}

void SetQuantDenseMinTokens(int64_t n) {
  Runtime& rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mu);
  rt.quant_dense_min_n = n < 0 ? -1 : n;
}

void SetAmxMinTokens(int64_t n) {
  Runtime& rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mu);
  rt.amx_min_n = n;
}

int64_t GetAmxMinTokens() {
  Runtime& rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mu);
  return rt.amx_min_n;
}

int MaxThreads() {
  const int logical = GetCpuFeatures().logical_cpus;
  const int64_t cap = int64_t{kThreadsPerCpu} * (logical > 0 ? logical : 1);
  return cap < kMinThreadCap ? kMinThreadCap : (cap > (1 << 20) ? (1 << 20) : static_cast<int>(cap));
}

namespace {

// Replaces the pool by one with the runtime's settings now (call with mu held). On failure the previous settings
// come back (their pool starts at the next call) and the error names what was asked.
const char* RebuildPool(Runtime& rt, int old_threads, bool old_pin, int old_spin, bool old_wait_all) {
  rt.pool.reset();  // join the old workers first: the new ones may need their share of the thread limit
  const std::string saved_config_error = rt.config_error;
  rt.config_error.clear();
  if (const char* e = rt.EnsurePool()) {
    const char* msg = Errorf("%s", e);
    rt.want_threads = old_threads;
    rt.pin = old_pin;
    rt.spin_us = old_spin;
    rt.wait_all = old_wait_all;
    rt.config_error = saved_config_error;
    return msg;
  }
  return nullptr;
}

}  // namespace

const char* SetNumThreads(int64_t n, int pin) {
  Runtime& rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mu);
  const std::string refused = CheckThreadCount("set_num_threads: n", static_cast<long long>(n));
  if (!refused.empty()) return Errorf("%s", refused.c_str());
  const int old_threads = rt.want_threads;
  const bool old_pin = rt.pin;
  rt.want_threads = n > 0 ? static_cast<int>(n) : 0;
  if (pin >= 0) rt.pin = pin != 0;
  return RebuildPool(rt, old_threads, old_pin, rt.spin_us, rt.wait_all);
}

const char* ResetNumThreads() {
  Runtime& rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mu);
  const int old_threads = rt.want_threads;
  rt.want_threads = 0;
  rt.config_error.clear();
  rt.ParseThreadsEnv();
  if (!rt.config_error.empty()) {
    rt.pool.reset();
    return nullptr;
  }
  return RebuildPool(rt, old_threads, rt.pin, rt.spin_us, rt.wait_all);
}

StreamedCallScope::StreamedCallScope() : saved_(t_call_spin_us) {
  Runtime& rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mu);
  t_call_spin_us = rt.streamed_spin_us;
}

StreamedCallScope::~StreamedCallScope() { t_call_spin_us = saved_; }

const char* SetPool(int64_t spin_us, int wait_all, int64_t streamed_spin_us) {
  Runtime& rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mu);
  if (spin_us > kMaxSpinUs)
    return Errorf("set_pool: spin_us = %lld is more than the %d microseconds (1 s) allowed; use 0..%d",
                  static_cast<long long>(spin_us), kMaxSpinUs, kMaxSpinUs);
  if (streamed_spin_us > kMaxSpinUs)
    return Errorf("set_pool: streamed_spin_us = %lld is more than the %d microseconds (1 s) allowed; use 0..%d",
                  static_cast<long long>(streamed_spin_us), kMaxSpinUs, kMaxSpinUs);
  if (streamed_spin_us >= -1) rt.streamed_spin_us = static_cast<int>(streamed_spin_us);  // -1: spin_us
  const int old_spin = rt.spin_us;
  const bool old_wait_all = rt.wait_all;
  if (spin_us >= 0) rt.spin_us = static_cast<int>(spin_us);
  if (wait_all >= 0) rt.wait_all = wait_all != 0;
  // A refused FIDDLER_KERNEL_THREADS stays refused: only the spin and the contract change here.
  if (!rt.config_error.empty()) {
    rt.pool.reset();
    return nullptr;
  }
  return RebuildPool(rt, rt.want_threads, rt.pin, old_spin, old_wait_all);
}

int GetNumThreads(const char** err) {
  Runtime& rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mu);
  if (const char* e = rt.EnsurePool()) {
    if (err) *err = Errorf("%s", e);
    return -1;
  }
  return rt.pool->size();
}

void SetPrefetchBytes(int bytes) {
  Runtime& rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mu);
  g_prefetch_bytes = ClampPrefetchBytes(bytes);
}

void SetAmxVariant(int variant) {
  Runtime& rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mu);
  g_amx_variant = ClampVariant(variant);
}

void SetAmxBlocking(int kc, int mb, int pass, int prefetch, int blocked_from, int pipeline) {
  Runtime& rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mu);
  if (kc >= 0) g_amx_kc = ClampKc(kc);  // 0: auto
  if (mb >= 0) g_amx_mb = ClampMb(mb);
  if (pass >= 0) g_amx_pass = ClampPass(pass);
  if (prefetch >= 0) g_amx_prefetch = prefetch != 0;
  if (blocked_from >= 0) g_amx_blocked_from = blocked_from;
  if (pipeline >= 0) g_amx_pipeline = pipeline != 0;
}

void SetAmxGroupKib(int kib) {
  Runtime& rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mu);
  g_amx_group_kib = ClampGroupKib(kib);
}

const char* ReadProbe(const void* const* p, const int64_t* bytes, int64_t n, uint64_t* sum) {
  if (n < 0) return Errorf("read_bandwidth: negative buffer count %lld", (long long)n);
  std::vector<int64_t> words(static_cast<size_t>(n));
  for (int64_t b = 0; b < n; ++b) {
    if (!p[b] || bytes[b] < 0) return Errorf("read_bandwidth: buffer %lld is null or has a negative size",
                                             (long long)b);
    words[b] = bytes[b] / 8;
  }
  Runtime& rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mu);
  if (const char* e = rt.EnsurePool()) return Errorf("read_bandwidth: %s", e);
  ProbeCall c;
  c.p = reinterpret_cast<const uint64_t* const*>(p);
  c.words = words.data();
  c.n = n;
  std::memset(c.sums, 0, sizeof(c.sums));
  rt.pool->SetIdleSpin(rt.spin_us);
  rt.pool->Run(ProbeRun, &c);
  uint64_t s = 0;
  for (uint64_t v : c.sums) s += v;
  for (int64_t b = 0; b < n; ++b) {  // the bytes after a buffer's last whole word
    const auto* tail = static_cast<const unsigned char*>(p[b]) + words[b] * 8;
    for (int64_t i = 0; i < bytes[b] % 8; ++i) s += tail[i];
  }
  if (sum) *sum = s;
  return nullptr;
}

const char* ExpertFfn(const uint16_t* x, int64_t n, int64_t hidden, int64_t ffn, const uint16_t* w1,
                      const uint16_t* w3, const uint16_t* w2, void* y, bool out_f32) {
  if (n < 0 || hidden < 0 || ffn < 0) return Errorf("expert_ffn: negative size (n=%lld hidden=%lld ffn=%lld)",
                                                   (long long)n, (long long)hidden, (long long)ffn);
  if (Overflows(n, hidden) || Overflows(ffn, hidden) || Overflows(n, ffn))
    return Errorf("expert_ffn: sizes too large");
  if (n == 0 || hidden == 0) return nullptr;
  if (ffn == 0) {
    ZeroOut(y, n * hidden, out_f32);
    return nullptr;
  }
  if (!x || !w1 || !w3 || !w2 || !y) return Errorf("expert_ffn: null buffer");
  Runtime& rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mu);
  if (const char* e = rt.EnsurePool()) return Errorf("expert_ffn: %s", e);
  const Path path = rt.Choose(n);
  if (!PathSupported(path)) return Errorf("expert_ffn: path %s not supported by this CPU", PathName(path));
  ThreadPool& pool = *rt.pool;
  pool.Wake();  // sleeping workers come up while the call is prepared
  pool.SetIdleSpin(t_call_spin_us >= 0 ? t_call_spin_us : rt.spin_us);
  const PathKernels* k = GetPathKernels(path);
  const bool in_place = ReadInPlace(k, x);
  const size_t xb = in_place ? 0 : Align64(k->act_bytes(n, hidden));
  const size_t hb = Align64(k->act_bytes(n, ffn));
  char* ws = static_cast<char*>(rt.ws_data.Get(xb + hb));
  if (!ws) return Errorf("expert_ffn: cannot allocate %zu bytes of workspace", xb + hb);
  Segment sg;
  sg.k = k;
  sg.qk = nullptr;
  sg.w1 = w1;
  sg.w3 = w3;
  sg.w2 = w2;
  sg.n = n;
  sg.first = 0;
  sg.idx = nullptr;
  sg.x_pack = in_place ? nullptr : ws;
  sg.x_act = in_place ? static_cast<const void*>(x) : sg.x_pack;
  sg.h_act = ws + xb;
  sg.out = OutView{y, hidden, out_f32};
  sg.cost1 = 2 * RowCost(path, n);
  sg.cost2 = RowCost(path, n);
  Call c;
  c.x = x;
  c.hidden = hidden;
  c.ffn = ffn;
  c.seg = &sg;
  c.nseg = 1;
  PlanTasks(c, pool.size(), rt.chunks_per_thread, kCombineElems);
  pool.Run(RunTasks, &c);
  return nullptr;
}

namespace {

// Where expert e's weights are: one bfloat16 stack with a fixed stride, or tables of per-expert pointers
// (bfloat16, or quantised with a table of scale pointers per matrix).
struct ExpertWeights {
  const uint16_t *w1, *w3, *w2;  // stacks (tables == false)
  const void* const *t1, *const *t3, *const *t2;  // per-expert tables (tables == true)
  const void* const *s1, *const *s3, *const *s2;  // their scales (quantised formats)
  bool tables;
  int64_t stride;  // ffn * hidden
  WeightFormat format;
  int64_t group1, group2;  // int4: inputs per scale of w1 / w3 (rows of hidden) and of w2 (rows of ffn)

  const uint16_t* W1(int64_t e) const { return tables ? static_cast<const uint16_t*>(t1[e]) : w1 + e * stride; }
  const uint16_t* W3(int64_t e) const { return tables ? static_cast<const uint16_t*>(t3[e]) : w3 + e * stride; }
  const uint16_t* W2(int64_t e) const { return tables ? static_cast<const uint16_t*>(t2[e]) : w2 + e * stride; }
  bool quantised() const { return format != WeightFormat::kBf16; }
  bool Held(int64_t e) const {
    return t1[e] && t3[e] && t2[e] && (!quantised() || (s1[e] && s3[e] && s2[e]));
  }
  QuantMatrix Q(const void* const* t, const void* const* sc, int64_t e, int64_t group) const {
    return QuantMatrix{t[e], sc[e], format, group};
  }
};

// Why a quantised format's groups do not fit the matrices, or nullptr (int4: a group divides its rows and is a
// multiple of 32 inputs, or the whole row: kernels.h).
const char* CheckGroups(const char* op, const ExpertWeights& ew, int64_t hidden, int64_t ffn) {
  if (ew.format != WeightFormat::kInt4) return nullptr;
  for (auto [name, group, k] : {std::tuple<const char*, int64_t, int64_t>{"w1/w3", ew.group1, hidden},
                                {"w2", ew.group2, ffn}}) {
    if (group < 1 || k % group != 0 || (group % 32 != 0 && group != k) || k % 2 != 0)
      return Errorf("%s: int4 group %lld does not fit %s rows of %lld inputs (a group must divide the row and be "
                    "a multiple of 32, or the whole row; rows have an even length)", op, (long long)group, name,
                    (long long)k);
  }
  return nullptr;
}

// Quantised rows through a bf16 path's phases: [r0, r1) dequantised to bf16 (avx512::DequantRowsBf16) a block
// of kDenseRows rows at a time into per-thread memory, and the path's phase run on each block. The phase indexes
// rows by their number in the matrix, so it gets the block's address moved back by the block's first row (only
// rows [j0, j1) are read). Blocks start on multiples of kDenseRows, so every path's row granule is kept.
constexpr int64_t kDenseRows = 128;
// The AMX phases read whole tiles of 16 rows (32 in phase 2) from a block's first row, bounded by the matrix's
// rows, not the block's: with blocks of a multiple of 32 rows every such read stays inside the block's memory.
static_assert(kDenseRows % 32 == 0, "dense blocks must hold whole AMX row tiles");

const uint16_t* RowsFrom(const uint16_t* block, int64_t first_row, int64_t k) {
  return reinterpret_cast<const uint16_t*>(reinterpret_cast<uintptr_t>(block) - first_row * k * sizeof(uint16_t));
}


size_t DenseSlotBytes(int64_t hidden, int64_t ffn) {
  return Align64(2 * kDenseRows * static_cast<size_t>(hidden > ffn ? hidden : ffn) * sizeof(uint16_t));
}

template <const PathKernels* K>
void DensePhase1(const void* x_act, int64_t n, int64_t hidden, const QuantMatrix& w1, const QuantMatrix& w3,
                 int64_t F, int64_t r0, int64_t r1, void* h_act) {
  uint16_t* buf = tl_dense_block;  // 2 x kDenseRows x hidden
  for (int64_t j0 = r0; j0 < r1; j0 += kDenseRows) {
    const int64_t j1 = j0 + kDenseRows < r1 ? j0 + kDenseRows : r1;
    avx512::DequantRowsBf16(w1, hidden, j0, j1, buf);
    avx512::DequantRowsBf16(w3, hidden, j0, j1, buf + kDenseRows * hidden);
    K->phase1(x_act, n, hidden, RowsFrom(buf, j0, hidden), RowsFrom(buf + kDenseRows * hidden, j0, hidden), F, j0,
              j1, h_act);
  }
}

template <const PathKernels* K>
void DensePhase2(const void* h_act, int64_t n, int64_t F, const QuantMatrix& w2, int64_t hidden, int64_t r0,
                 int64_t r1, OutView out) {
  uint16_t* buf = tl_dense_block;  // kDenseRows x F
  for (int64_t i0 = r0; i0 < r1; i0 += kDenseRows) {
    const int64_t i1 = i0 + kDenseRows < r1 ? i0 + kDenseRows : r1;
    avx512::DequantRowsBf16(w2, F, i0, i1, buf);
    K->phase2(h_act, n, F, RowsFrom(buf, i0, F), hidden, i0, i1, out);
  }
}

const QuantKernels kDenseAmx = {DensePhase1<&amx::kKernels>, DensePhase2<&amx::kKernels>};
const QuantKernels kDenseAvx512 = {DensePhase1<&avx512::kKernels>, DensePhase2<&avx512::kKernels>};

// How a quantised segment of n tokens runs: its path and its phases. Few tokens: the quantised phases of
// AVX512_BF16 (generic where the CPU lacks it or generic is forced). From quant_dense_min_n tokens (auto: AMX's
// threshold, on an AMX CPU) the rows go dense to the bf16 path the call would choose (AMX, or AVX512_BF16).
std::pair<Path, const QuantKernels*> QuantChoice(const Runtime& rt, int64_t n) {
  if (rt.forced == Path::kGeneric || !PathSupported(Path::kAvx512Bf16))
    return {Path::kGeneric, GetQuantKernels(Path::kGeneric)};
  const bool amx = GetCpuFeatures().can_amx();
  const int64_t dense_from = rt.quant_dense_min_n >= 0 ? rt.quant_dense_min_n : (amx ? rt.amx_min_n : INT64_MAX);
  if (n >= dense_from) {
    const Path p = rt.Choose(n);
    if (p == Path::kAmx) return {p, &kDenseAmx};
    if (p == Path::kAvx512Bf16) return {p, &kDenseAvx512};
  }
  return {Path::kAvx512Bf16, GetQuantKernels(Path::kAvx512Bf16)};
}

const char* GroupedImpl(const char* op, const uint16_t* x, int64_t T, int64_t hidden, int64_t ffn, int64_t E,
                        const int32_t* token_idx, const int32_t* expert_idx, const float* weights, int64_t A,
                        const ExpertWeights& ew, void* y, bool out_f32) {
  if (T < 0 || hidden < 0 || ffn < 0 || E < 0 || A < 0)
    return Errorf("%s: negative size (T=%lld hidden=%lld ffn=%lld E=%lld A=%lld)", op, (long long)T,
                  (long long)hidden, (long long)ffn, (long long)E, (long long)A);
  if (A > INT32_MAX || T > INT32_MAX || Overflows(T, hidden) || Overflows(ffn, hidden) ||
      Overflows(E, ffn * hidden) || Overflows(A, hidden) || Overflows(A, ffn))
    return Errorf("%s: sizes too large", op);
  if (ew.quantised() && !ew.tables) return Errorf("%s: quantised experts come as tables", op);
  if (const char* err = CheckGroups(op, ew, hidden, ffn)) return err;
  // Validate every assignment before touching anything it indexes.
  for (int64_t a = 0; a < A; ++a) {
    if (token_idx[a] < 0 || token_idx[a] >= T)
      return Errorf("%s: token_idx[%lld] = %d is out of range [0, %lld)", op, (long long)a, token_idx[a],
                    (long long)T);
    if (expert_idx[a] < 0 || expert_idx[a] >= E)
      return Errorf("%s: expert_idx[%lld] = %d is out of range [0, %lld)", op, (long long)a, expert_idx[a],
                    (long long)E);
    const float w = weights[a];
    if (!(w >= 0.f) || std::isinf(w))
      return Errorf("%s: weights[%lld] = %g: routing weights must be finite and >= 0", op, (long long)a,
                    static_cast<double>(w));
    const int32_t e = expert_idx[a];
    if (ew.tables && !ew.Held(e))
      return Errorf("%s: expert_idx[%lld] = %d has no weights (null table entry): that expert is not held on "
                    "the host", op, (long long)a, e);
  }
  if (T == 0 || hidden == 0) return nullptr;
  if (A == 0 || ffn == 0) {
    ZeroOut(y, T * hidden, out_f32);
    return nullptr;
  }
  Runtime& rt = Rt();
  std::lock_guard<std::mutex> lock(rt.mu);
  if (const char* e = rt.EnsurePool()) return Errorf("%s: %s", op, e);
  ThreadPool& pool = *rt.pool;
  pool.Wake();  // sleeping workers come up while the call is prepared
  pool.SetIdleSpin(t_call_spin_us >= 0 ? t_call_spin_us : rt.spin_us);

  // Index workspace: expert offsets [E+1], token offsets [T+1], gather [A], tok_list [A], pos [A], seg [E].
  const size_t ib = Align64(sizeof(int32_t) * (E + 1)) + Align64(sizeof(int32_t) * (T + 1)) +
                    3 * Align64(sizeof(int32_t) * A) + Align64(sizeof(Segment) * (E < A ? E : A));
  char* iw = static_cast<char*>(rt.ws_index.Get(ib));
  if (!iw) return Errorf("%s: cannot allocate %zu bytes of index workspace", op, ib);
  int32_t* exp_off = reinterpret_cast<int32_t*>(iw);
  iw += Align64(sizeof(int32_t) * (E + 1));
  int32_t* tok_off = reinterpret_cast<int32_t*>(iw);
  iw += Align64(sizeof(int32_t) * (T + 1));
  int32_t* gather = reinterpret_cast<int32_t*>(iw);
  iw += Align64(sizeof(int32_t) * A);
  int32_t* tok_list = reinterpret_cast<int32_t*>(iw);
  iw += Align64(sizeof(int32_t) * A);
  int32_t* pos = reinterpret_cast<int32_t*>(iw);
  iw += Align64(sizeof(int32_t) * A);
  Segment* seg = reinterpret_cast<Segment*>(iw);

  // Stable counting sorts: by expert (rows of each expert's token batch) and by token (for the combine).
  std::memset(exp_off, 0, sizeof(int32_t) * (E + 1));
  std::memset(tok_off, 0, sizeof(int32_t) * (T + 1));
  for (int64_t a = 0; a < A; ++a) {
    ++exp_off[expert_idx[a] + 1];
    ++tok_off[token_idx[a] + 1];
  }
  for (int64_t e = 0; e < E; ++e) exp_off[e + 1] += exp_off[e];
  for (int64_t t = 0; t < T; ++t) tok_off[t + 1] += tok_off[t];
  for (int64_t a = 0; a < A; ++a) {  // exp_off[e] becomes the end of e; restored below
    const int32_t p = exp_off[expert_idx[a]]++;
    pos[a] = p;
    gather[p] = token_idx[a];
    tok_list[tok_off[token_idx[a]]++] = static_cast<int32_t>(a);
  }
  for (int64_t e = E; e > 0; --e) exp_off[e] = exp_off[e - 1];
  exp_off[0] = 0;
  for (int64_t t = T; t > 0; --t) tok_off[t] = tok_off[t - 1];
  tok_off[0] = 0;

  // Segments (active experts) and the data workspace: y rows, then each segment's packed x (unless the path
  // reads x in place and the segment's tokens are consecutive, aligned rows of x, as in decode) and h.
  int64_t nseg = 0;
  size_t db = Align64(sizeof(float) * A * hidden);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t cnt = exp_off[e + 1] - exp_off[e];
    if (cnt == 0) continue;
    const auto [path, qk] = ew.quantised() ? QuantChoice(rt, cnt) : std::make_pair(rt.Choose(cnt), nullptr);
    if (!PathSupported(path)) return Errorf("%s: path %s not supported by this CPU", op, PathName(path));
    Segment& s = *new (&seg[nseg++]) Segment();
    s.k = GetPathKernels(path);
    s.qk = qk;
    if (ew.quantised()) {
      s.q1 = ew.Q(ew.t1, ew.s1, e, ew.group1);
      s.q3 = ew.Q(ew.t3, ew.s3, e, ew.group1);
      s.q2 = ew.Q(ew.t2, ew.s2, e, ew.group2);
      s.w1 = s.w3 = s.w2 = nullptr;
    } else {
      s.w1 = ew.W1(e);
      s.w3 = ew.W3(e);
      s.w2 = ew.W2(e);
    }
    s.n = cnt;
    s.first = exp_off[e];
    s.idx = gather + s.first;
    s.cost1 = 2 * RowCost(path, cnt);
    s.cost2 = RowCost(path, cnt);
    const uint16_t* rows = x + static_cast<int64_t>(s.idx[0]) * hidden;
    bool in_place = ReadInPlace(s.k, rows);
    for (int64_t t = 1; in_place && t < cnt; ++t) in_place = s.idx[t] == s.idx[0] + t;
    s.x_act = in_place ? rows : nullptr;
    s.x_pack = nullptr;
    if (!in_place) db += Align64(s.k->act_bytes(cnt, hidden));
    db += Align64(s.k->act_bytes(cnt, ffn));
  }
  char* dw = static_cast<char*>(rt.ws_data.Get(db));
  if (!dw) return Errorf("%s: cannot allocate %zu bytes of workspace", op, db);
  float* ybuf = reinterpret_cast<float*>(dw);
  dw += Align64(sizeof(float) * A * hidden);
  for (int64_t s = 0; s < nseg; ++s) {
    Segment& sg = seg[s];
    if (!sg.x_act) {
      sg.x_pack = dw;
      sg.x_act = dw;
      dw += Align64(sg.k->act_bytes(sg.n, hidden));
    }
    sg.h_act = dw;
    dw += Align64(sg.k->act_bytes(sg.n, ffn));
    sg.out = OutView{ybuf + sg.first * hidden, hidden, true};
  }
  Call c;
  c.x = x;
  c.hidden = hidden;
  c.ffn = ffn;
  c.seg = seg;
  c.nseg = nseg;
  c.T = T;
  c.weights = weights;
  c.tok_off = tok_off;
  c.tok_list = tok_list;
  c.pos = pos;
  c.ybuf = ybuf;
  c.out = y;
  c.out_f32 = out_f32;
  bool dense = false;
  for (int64_t s = 0; s < nseg; ++s) dense = dense || seg[s].qk == &kDenseAmx || seg[s].qk == &kDenseAvx512;
  if (dense) {
    c.dense_slot = DenseSlotBytes(hidden, ffn);
    c.dense_ws = static_cast<char*>(rt.ws_dense.Get(c.dense_slot * static_cast<size_t>(pool.size())));
    if (!c.dense_ws)
      return Errorf("%s: cannot allocate %zu bytes for dequantised weight blocks", op,
                    c.dense_slot * static_cast<size_t>(pool.size()));
  }
  PlanTasks(c, pool.size(), rt.chunks_per_thread, kCombineElems);
  pool.Run(RunTasks, &c);
  return nullptr;
}

}  // namespace

const char* GroupedExpertFfn(const uint16_t* x, int64_t T, int64_t hidden, int64_t ffn, int64_t E,
                             const int32_t* token_idx, const int32_t* expert_idx, const float* weights,
                             int64_t A, const uint16_t* w1, const uint16_t* w3, const uint16_t* w2, void* y,
                             bool out_f32) {
  const ExpertWeights ew{w1,      w3,      w2,    nullptr,      nullptr,      nullptr, nullptr, nullptr,
                         nullptr, false,   ffn * hidden, WeightFormat::kBf16, 0,       0};
  return GroupedImpl("grouped_expert_ffn", x, T, hidden, ffn, E, token_idx, expert_idx, weights, A, ew, y,
                     out_f32);
}

const char* GroupedExpertFfnTables(const uint16_t* x, int64_t T, int64_t hidden, int64_t ffn, int64_t E,
                                   const int32_t* token_idx, const int32_t* expert_idx, const float* weights,
                                   int64_t A, WeightFormat format, int64_t group1, int64_t group2,
                                   const void* const* w1, const void* const* s1, const void* const* w3,
                                   const void* const* s3, const void* const* w2, const void* const* s2, void* y,
                                   bool out_f32) {
  const char* op = "grouped_expert_ffn_tables";
  const bool quantised = format != WeightFormat::kBf16;
  if (format != WeightFormat::kBf16 && format != WeightFormat::kInt8 && format != WeightFormat::kInt4)
    return Errorf("%s: unknown weight format %d (0 bf16, 1 int8, 2 int4)", op, static_cast<int>(format));
  if (E > 0 && A > 0 && (!w1 || !w3 || !w2)) return Errorf("%s: null weight table", op);
  if (E > 0 && A > 0 && quantised && (!s1 || !s3 || !s2)) return Errorf("%s: null scale table", op);
  const ExpertWeights ew{nullptr, nullptr, nullptr, w1,     w3,     w2,     s1,    s3,
                         s2,      true,    ffn * hidden, format, group1, group2};
  return GroupedImpl(op, x, T, hidden, ffn, E, token_idx, expert_idx, weights, A, ew, y, out_f32);
}

}  // namespace fiddler
