// The streamed CPU lane: one layer step's CPU-lane experts as a pair of XLA custom calls, so a decode step needs
// no host sync and the GPU works on the resident experts while the CPU works on the offloaded ones.
//
// begin(packed, tokens=T, top_k=k, hidden=H) -> ticket: `packed` is one uint8 buffer [x bf16 T*H | experts int32
// T*k | weights f32 T*k | tables id int32] (the jitted caller packs it, so one device-to-host copy moves it; the
// layer's id is data, so one compiled program serves every layer). end(ticket) -> out f32 [T, H]. For one call:
//   1. the assignments (t, experts[t, j], weights[t, j]) whose expert the layer's table holds on the host are
//      kept (the others are GPU-resident: the engine's resident mix covers them);
//   2. out = their grouped expert FFN (GroupedExpertFfnTables over the pinned weights), zero where a token has none.
// On the "cpu" platform begin runs steps 1-2 in place and writes its slot and use into the ticket, and end copies
// that slot's result out (XLA:CPU may run a program before an earlier one whose inputs are not ready, so ends find
// their begins by ticket). On "CUDA" both are queued on XLA's stream, where the host cannot wait for anything:
// begin copies `packed` into a pinned slot (cuMemcpyDtoHAsync) and queues a host function (cuLaunchHostFunc) that
// hands the slot to the lane's worker thread and returns at once, so the stream goes on to the next work (the
// resident experts' mix); end pairs with the oldest open begin (the stream runs a device's programs in dispatch
// order, and the engine dispatches begin, the resident mix, end) and queues a host function that runs the slot
// itself if the worker has not picked it up yet, else waits until the worker has run it -- spinning briefly, then
// asleep, so it does not hold a core for the whole run -- then the copy of the output back (cuMemcpyHtoDAsync). Padding (weight 0) is neither counted nor run.
// The CUDA driver is found at run time (dlopen of libcuda.so.1, which JAX has loaded), so this file needs no CUDA
// headers and the library still loads on machines without a GPU.
// A host function cannot return an error to XLA: its first error is kept (fj_streamed_lane_error) and its output
// is zero; the engine checks after each forward pass and raises.
// Each call leaves a record (fj_streamed_lane_records): its tokens, the assignments the CPU ran, its span and the
// tokens routed to each of the layer's experts. A layer registers with at most kFjStreamedMaxExperts (256)
// experts, the size of the C record's counts; the ring keeps each record's counts at the layer's own size, so
// its memory follows the model (8192 records of a 128-expert layer: under 3 MB).
// With timing on (fj_streamed_lane_set_timing), a CUDA call also records four events on the stream -- before its
// input copy (the GPU work before it is done), after it, before end's wait and after the output copy -- and its
// record carries their times on the host clock (anchored where the worker picked the slot up): the GPU spans of a
// streamed step.
#include <dlfcn.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "capi.h"
#include "expert_ffn.h"
#include "ffi_checks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

struct CUstream_st;  // opaque CUDA types: only pointers to them cross this file
struct CUctx_st;
struct CUevent_st;

namespace {

// -- registered layers ----------------------------------------------------------------------------------------
struct LayerTables {
  int64_t E = 0, hidden = 0, ffn = 0;
  fiddler::WeightFormat format = fiddler::WeightFormat::kBf16;
  int64_t group1 = 0, group2 = 0;       // int4: inputs per scale in w1 / w3 and in w2
  std::vector<const void*> w1, w3, w2;  // null: the expert is not on the host (GPU-resident)
  std::vector<const void*> s1, s3, s2;  // their scales (quantised formats; else null)
};

std::mutex g_tables_mu;
// The globals below live on the heap and are never destroyed: the detached worker may still use them while the
// process exits.
std::vector<std::shared_ptr<const LayerTables>>& g_tables = *new std::vector<std::shared_ptr<const LayerTables>>;

std::shared_ptr<const LayerTables> FindTables(int64_t id) {
  std::lock_guard<std::mutex> lock(g_tables_mu);
  if (id < 0 || id >= static_cast<int64_t>(g_tables.size())) return nullptr;
  return g_tables[id];
}

// -- records (the engine's trace) and the first host-side error ------------------------------------------------
struct Slot;

struct Record {
  int64_t tables = 0, tokens = 0, assignments = 0, start_ns = 0, end_ns = 0;
  std::vector<uint16_t> counts;  // one per expert of the layer
  int64_t seq = 0;                // the record's number (records made before it)
  int64_t gpu_ns[4] = {0, 0, 0, 0};  // a timed CUDA call's four events on the host clock (0: untimed)
  Slot* pending = nullptr;        // a timed call whose events are not resolved yet: its slot
  int64_t use = 0;                // and the slot's use the events belong to
};

constexpr size_t kRecordRing = 8192;
// The worker adds records to `g_incoming` under its own mutex and never takes `g_records_mu`: readers move them to
// `g_records` (AbsorbIncoming) and may query CUDA events under `g_records_mu`, so a driver call there can never wait
// on a worker that a stream's host function waits on. Lock order: g_records_mu, then g_incoming_mu.
std::mutex g_records_mu;
std::deque<Record>& g_records = *new std::deque<Record>;  // at most kRecordRing, oldest dropped
std::mutex g_incoming_mu;
std::deque<Record>& g_incoming = *new std::deque<Record>;  // at most kRecordRing, oldest dropped
int64_t g_records_dropped = 0;  // under g_incoming_mu
int64_t g_records_made = 0;     // under g_incoming_mu

std::mutex g_error_mu;
std::string& g_error = *new std::string;

void SetError(const std::string& msg) {
  std::lock_guard<std::mutex> lock(g_error_mu);
  if (g_error.empty()) g_error = msg;
}

int64_t NowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// Steps 1-2 of the file comment for the layer registered under `id`, filling `rec` (its counts, tokens and span).
// Returns nullptr or an error message (thread-local storage); `rec` is complete unless an index was out of range.
const char* RunLane(int64_t id, const LayerTables* tables, const uint16_t* x, int64_t T, int64_t k,
                    const int32_t* experts, const float* weights, float* out, Record& rec, bool& recorded) {
  static thread_local std::string msg;
  int64_t start = NowNs();
  recorded = false;
  rec.tables = id;
  rec.tokens = T;
  rec.counts.assign(tables->E, 0);
  std::vector<int32_t> tok, exp;
  std::vector<float> wts;
  tok.reserve(T * k), exp.reserve(T * k), wts.reserve(T * k);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      int32_t e = experts[t * k + j];
      if (e < 0 || e >= tables->E) {
        msg = "streamed_cpu_mix: expert index " + std::to_string(e) + " out of range [0, " +
              std::to_string(tables->E) + ")";
        return msg.c_str();
      }
      if (weights[t * k + j] == 0.0f) continue;  // a row's left padding: no token, no work
      if (rec.counts[e] != UINT16_MAX) rec.counts[e] += 1;
      if (tables->w1[e] == nullptr) continue;  // GPU-resident
      tok.push_back(static_cast<int32_t>(t)), exp.push_back(e), wts.push_back(weights[t * k + j]);
    }
  }
  rec.assignments = static_cast<int64_t>(tok.size());
  const char* err = nullptr;
  if (tok.empty()) {
    std::memset(out, 0, sizeof(float) * T * tables->hidden);
  } else {
    fiddler::StreamedCallScope hot;  // the next layer's call comes soon: the pool keeps spinning for it
    const LayerTables& t = *tables;
    err = fiddler::GroupedExpertFfnTables(x, T, t.hidden, t.ffn, t.E, tok.data(), exp.data(), wts.data(),
                                          rec.assignments, t.format, t.group1, t.group2, t.w1.data(), t.s1.data(),
                                          t.w3.data(), t.s3.data(), t.w2.data(), t.s2.data(), out,
                                          /*out_f32=*/true);
  }
  rec.start_ns = start;
  rec.end_ns = NowNs();
  recorded = true;
  return err;
}

// Adds a record to the ring; returns its number.
int64_t PushRecord(Record&& rec) {
  std::lock_guard<std::mutex> lock(g_incoming_mu);
  rec.seq = g_records_made++;
  if (g_incoming.size() >= kRecordRing) {
    g_incoming.pop_front();
    ++g_records_dropped;
  }
  g_incoming.push_back(std::move(rec));
  return g_incoming.back().seq;
}

// Moves the worker's new records into the ring (call with g_records_mu held).
void AbsorbIncoming() {
  std::lock_guard<std::mutex> lock(g_incoming_mu);
  for (Record& rec : g_incoming) {
    if (g_records.size() >= kRecordRing) {
      g_records.pop_front();
      ++g_records_dropped;
    }
    g_records.push_back(std::move(rec));
  }
  g_incoming.clear();
}

// The record numbered `seq` in the ring, or null (call with g_records_mu held; seqs ascend, with gaps where
// records were dropped).
Record* FindRecord(int64_t seq) {
  auto it = std::lower_bound(g_records.begin(), g_records.end(), seq,
                             [](const Record& r, int64_t v) { return r.seq < v; });
  return it != g_records.end() && it->seq == seq ? &*it : nullptr;
}

// The packed input's parts (bytes from the start of the buffer), for T tokens, top-k routing and hidden size H:
// x first, so the kernel reads it from the slot's 64-byte-aligned start.
struct Packed {
  size_t x = 0, experts = 0, weights = 0, id = 0, bytes = 0;
  Packed(int64_t T, int64_t k, int64_t H) {
    experts = x + static_cast<size_t>(T) * H * 2;
    weights = experts + static_cast<size_t>(T) * k * 4;
    id = weights + static_cast<size_t>(T) * k * 4;
    bytes = id + 4;
  }
};

// Checks a begin call's static shape: "" or an error message.
std::string CheckBegin(const ffi::AnyBuffer& packed, const ffi::AnyBuffer& ticket, int64_t T, int64_t k,
                       int64_t H) {
  const char* op = "streamed_cpu_begin";
  std::string e;
  if (!(e = fiddler::Check(op, "packed", packed, ffi::DataType::U8, 1)).empty()) return e;
  if (!(e = fiddler::Check(op, "ticket", ticket, ffi::DataType::S32, 1)).empty()) return e;
  if (ticket.dimensions()[0] != 2) return std::string(op) + ": ticket must hold 2 int32, got " + fiddler::Shape(ticket);
  if (T < 1 || k < 1 || H < 1)
    return std::string(op) + ": tokens, top_k and hidden must be positive, got " + std::to_string(T) + ", " +
           std::to_string(k) + ", " + std::to_string(H);
  const Packed p(T, k, H);
  if (static_cast<size_t>(packed.dimensions()[0]) != p.bytes)
    return std::string(op) + ": packed holds " + std::to_string(packed.dimensions()[0]) + " bytes, expected " +
           std::to_string(p.bytes) + " for " + std::to_string(T) + " tokens, top-" + std::to_string(k) +
           " and hidden " + std::to_string(H);
  return "";
}

// The layer id a packed call names.
int32_t LayerId(const char* packed, const Packed& p) {
  int32_t id = 0;
  std::memcpy(&id, packed + p.id, sizeof id);
  return id;
}

// The layer a packed call names, checked against the call's hidden size: the tables, or null and `err` set.
std::shared_ptr<const LayerTables> TablesOf(const char* packed, const Packed& p, int64_t H, std::string& err) {
  const int32_t id = LayerId(packed, p);
  auto tables = FindTables(id);
  if (!tables) {
    err = "streamed_cpu_mix: no layer tables registered under id " + std::to_string(id);
  } else if (tables->hidden != H) {
    err = "streamed_cpu_mix: x has hidden size " + std::to_string(H) + ", the layer's experts " +
          std::to_string(tables->hidden);
    tables = nullptr;
  }
  return tables;
}

// -- CUDA: the driver API, found at run time ------------------------------------------------------------------
using CUresult = int;
using CUdeviceptr = unsigned long long;
using CUstream = CUstream_st*;
using CUcontext = CUctx_st*;
using CUevent = CUevent_st*;
using CUhostFn = void (*)(void*);

struct Driver {
  CUresult (*memcpy_dtoh)(void*, CUdeviceptr, size_t, CUstream) = nullptr;
  CUresult (*memcpy_htod)(CUdeviceptr, const void*, size_t, CUstream) = nullptr;
  CUresult (*launch_host_func)(CUstream, CUhostFn, void*) = nullptr;
  CUresult (*mem_host_alloc)(void**, size_t, unsigned int) = nullptr;
  CUresult (*ctx_get_current)(CUcontext*) = nullptr;
  CUresult (*stream_get_ctx)(CUstream, CUcontext*) = nullptr;
  CUresult (*ctx_push)(CUcontext) = nullptr;
  CUresult (*ctx_pop)(CUcontext*) = nullptr;
  CUresult (*event_create)(CUevent*, unsigned int) = nullptr;
  CUresult (*event_record)(CUevent, CUstream) = nullptr;
  CUresult (*event_query)(CUevent) = nullptr;
  CUresult (*event_elapsed)(float*, CUevent, CUevent) = nullptr;
  CUresult (*stream_query)(CUstream) = nullptr;
  CUresult (*error_string)(CUresult, const char**) = nullptr;
  std::string missing;  // non-empty: why the driver is unusable

  std::string Describe(CUresult r) const {
    const char* s = nullptr;
    if (error_string) error_string(r, &s);
    return s ? std::string(s) : "CUDA error " + std::to_string(r);
  }
};

const Driver& GetDriver() {
  static const Driver driver = [] {
    Driver d;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (!lib) lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) {
      d.missing = "libcuda.so.1 cannot be opened";
      return d;
    }
    auto get = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
      if (!fn && d.missing.empty()) d.missing = std::string("libcuda.so.1 has no ") + name;
    };
    get(d.memcpy_dtoh, "cuMemcpyDtoHAsync_v2");
    get(d.memcpy_htod, "cuMemcpyHtoDAsync_v2");
    get(d.launch_host_func, "cuLaunchHostFunc");
    get(d.mem_host_alloc, "cuMemHostAlloc");
    get(d.ctx_get_current, "cuCtxGetCurrent");
    get(d.stream_get_ctx, "cuStreamGetCtx");
    get(d.ctx_push, "cuCtxPushCurrent_v2");
    get(d.ctx_pop, "cuCtxPopCurrent_v2");
    get(d.event_create, "cuEventCreate");
    get(d.event_record, "cuEventRecord");
    get(d.event_query, "cuEventQuery");
    get(d.event_elapsed, "cuEventElapsedTime");
    get(d.stream_query, "cuStreamQuery");
    get(d.error_string, "cuGetErrorString");
    return d;
  }();
  return driver;
}

// -- slots: one open call each ----------------------------------------------------------------------------------
// A slot's host buffer holds [packed input | out f32 T*H] (pinned on CUDA). A ring of slots, each reused only after
// its previous call's end has run (its wait host function, on CUDA), so a slot's fields are never rewritten while
// a queued host function or the worker still reads them. A slot that must grow keeps its old buffer (a queued copy
// may still name it): bounded, since sizes only grow.
constexpr int kEvents = 4;  // before the input copy, after it, before end's wait, after the output copy

struct Slot {
  char* host = nullptr;
  size_t capacity = 0;
  bool pinned = false;
  std::vector<char*> retired;
  int64_t T = 0, k = 0, hidden = 0;
  size_t off_out = 0;
  std::atomic<int64_t> issued{0};  // begins enqueued
  std::atomic<int64_t> ran{0};     // runs finished by the worker (or in place)
  std::atomic<int64_t> ended{0};   // ends that have waited (CUDA) or copied (cpu), or abandoned
  std::atomic<int64_t> handed{0};  // uses begin's host function handed to the worker (CUDA)
  CUevent events[kEvents] = {};
  bool timed = false;                      // this use records the events
  std::atomic<int64_t> events_use{0};      // the use whose four events are all recorded (set by end)
  std::atomic<int64_t> landed_ns{0};       // when begin's host function ran: the input copy had just landed
  int64_t record_seq = -1;                 // this use's record, while its events are unresolved
  CUcontext ctx = nullptr;                 // the stream's context (the events' queries make it current)
  CUstream stream = nullptr;               // the stream of this use (CUDA)
};

constexpr int kSlots = 128;
Slot* const g_slots = new Slot[kSlots];
std::mutex g_slots_mu;      // enqueuing (begin, end, abandon): one thread at a time
int64_t g_next_slot = 0;
std::deque<Slot*>& g_open = *new std::deque<Slot*>;  // begun, not yet ended, oldest first (CUDA)
std::atomic<bool> g_timing{false};

size_t Align(size_t n) { return (n + 63) / 64 * 64; }

bool ResolveSpans(Record& rec);
const Driver& GetDriver();

// Signalled after every run (a slot's `ran` stored): end's host function sleeps on it.
struct RanSignal {
  std::mutex mu;
  std::condition_variable cv;
};

RanSignal& Ran() {
  static RanSignal* signal = new RanSignal;  // never destroyed (the detached worker signals it)
  return *signal;
}

// A context made current for driver calls, when the calling thread has none: `known`, else the stream's (XLA's
// enqueuing thread usually has one already; the Python thread that drains records may not).
struct ContextGuard {
  const Driver& cu;
  CUcontext ctx = nullptr;
  bool pushed = false;
  std::string error;
  ContextGuard(const Driver& d, CUstream stream, CUcontext known = nullptr) : cu(d) {
    if (cu.ctx_get_current(&ctx) == 0 && ctx != nullptr) return;
    ctx = known;
    if (!ctx) {
      CUresult r = cu.stream_get_ctx(stream, &ctx);
      if (r != 0) {
        error = "cuStreamGetCtx: " + cu.Describe(r);
        return;
      }
    }
    CUresult r = cu.ctx_push(ctx);
    if (r != 0) {
      error = "cuCtxPushCurrent: " + cu.Describe(r);
      return;
    }
    pushed = true;
  }
  ~ContextGuard() {
    if (pushed) cu.ctx_pop(&ctx);
  }
};

// Whether the slot's stream is in an error state (then its host functions never run). Makes the stream's context
// current if no context is.
bool StreamFailed(const Slot& s) {
  if (!s.stream) return false;
  const Driver& cu = GetDriver();
  ContextGuard guard(cu, s.stream, s.ctx);
  if (!guard.error.empty()) return false;
  const CUresult r = cu.stream_query(s.stream);
  return r != 0 && r != 600 /* CUDA_ERROR_NOT_READY */;
}

// Waits until `count` (the slot's `ran` or `ended`) reaches the slot's last use: true. On a failed stream (its host
// functions never run) it waits only for a run the worker already holds, and returns false.
bool WaitUse(Slot& s, const std::atomic<int64_t>& count) {
  const int64_t use = s.issued.load(std::memory_order_relaxed);
  for (int polls = 1; count.load(std::memory_order_acquire) < use; ++polls) {
    std::this_thread::sleep_for(std::chrono::microseconds(20));
    if (polls % 500 == 0 && StreamFailed(s)) {
      while (s.handed.load(std::memory_order_acquire) == use && s.ran.load(std::memory_order_acquire) < use)
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      return false;
    }
  }
  return true;
}

// A timed use's record, before its slot is reused or abandoned: its GPU times filled in (`resolve`: the events have
// completed) or the record left untimed.
void SettleSpans(Slot& s, bool resolve) {
  if (s.record_seq < 0) return;
  std::lock_guard<std::mutex> lock(g_records_mu);
  AbsorbIncoming();
  if (Record* rec = FindRecord(s.record_seq))
    if (rec->pending == &s && !(resolve && ResolveSpans(*rec))) rec->pending = nullptr;
  s.record_seq = -1;
}

// Waits until a slot's previous use has ended (and its events, if timed, have resolved into its record), then
// sizes its buffer for `need` bytes. "" or an error message.
std::string Reserve(Slot& s, size_t need, bool pinned, const Driver* cu) {
  if (!WaitUse(s, s.ended)) {
    s.ended.store(s.issued.load(std::memory_order_relaxed), std::memory_order_release);
    return "the GPU stream failed (its host functions no longer run); restart the process";
  }
  if (s.record_seq >= 0) {  // the events are about to be recorded again: resolve the last use's now
    // wait for its last event without the records' lock (a reader draining records must not wait on the stream)
    if (cu && s.events_use.load(std::memory_order_acquire) == s.issued.load(std::memory_order_relaxed))
      while (cu->event_query(s.events[3]) == 600 /* CUDA_ERROR_NOT_READY */)
        std::this_thread::sleep_for(std::chrono::microseconds(20));
    SettleSpans(s, /*resolve=*/true);  // a use whose end never came stays untimed
  }
  if (need <= s.capacity && pinned == s.pinned) return "";
  void* p = nullptr;
  size_t grow = std::max(need, 2 * s.capacity);
  if (pinned) {
    CUresult r = cu->mem_host_alloc(&p, grow, 0);
    if (r != 0) return "cuMemHostAlloc: " + cu->Describe(r);
  } else {
    p = std::aligned_alloc(64, Align(grow));
    if (!p) return "cannot allocate " + std::to_string(grow) + " bytes of staging";
  }
  if (s.host) s.retired.push_back(s.host);
  s.host = static_cast<char*>(p), s.capacity = grow, s.pinned = pinned;
  return "";
}

// Steps 1-2 for a slot whose packed input has landed: runs the lane into the slot's output (zero and the error
// kept on failure), records the call and marks the slot's use as run.
void RunSlot(Slot* s) {
  std::string err;
  const Packed p(s->T, s->k, s->hidden);
  auto tables = TablesOf(s->host, p, s->hidden, err);
  float* out = reinterpret_cast<float*>(s->host + s->off_out);
  if (tables) {
    const int32_t id = LayerId(s->host, p);
    Record rec;
    bool recorded = false;
    const char* lane_err = RunLane(id, tables.get(), reinterpret_cast<const uint16_t*>(s->host + p.x), s->T, s->k,
                                   reinterpret_cast<const int32_t*>(s->host + p.experts),
                                   reinterpret_cast<const float*>(s->host + p.weights), out, rec, recorded);
    if (lane_err) err = lane_err;
    if (recorded) {
      if (s->timed) rec.pending = s, rec.use = s->issued.load(std::memory_order_relaxed);
      const int64_t seq = PushRecord(std::move(rec));
      if (s->timed) s->record_seq = seq;
    }
  }
  if (!err.empty()) {
    SetError(err);
    std::memset(out, 0, sizeof(float) * s->T * s->hidden);
  }
  s->ran.store(s->issued.load(std::memory_order_relaxed), std::memory_order_release);
  RanSignal& signal = Ran();
  { std::lock_guard<std::mutex> lock(signal.mu); }  // a waiter between its check and its sleep sees the store
  signal.cv.notify_all();
}

// -- the worker thread: runs begun slots in order (CUDA) ---------------------------------------------------------
// Its queue lives on the heap and is never destroyed: the detached worker still waits on it when the process exits
// (destroying a condition variable a thread waits on would hang the exit).
struct WorkQueue {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Slot*> slots;
};

WorkQueue& Work() {
  static WorkQueue* queue = new WorkQueue;
  return *queue;
}

void WorkerLoop() {
  WorkQueue& q = Work();
  for (;;) {
    Slot* s = nullptr;
    {
      std::unique_lock<std::mutex> lock(q.mu);
      q.cv.wait(lock, [&] { return !q.slots.empty(); });
      s = q.slots.front();
      q.slots.pop_front();
    }
    RunSlot(s);
  }
}

void StartWorker() {
  static std::once_flag once;
  std::call_once(once, [] {
    Work();
    std::thread(WorkerLoop).detach();
  });
}

void BeginHostFn(void* arg) {  // hands the slot to the worker and returns: the stream goes on
  Slot* slot = static_cast<Slot*>(arg);
  slot->landed_ns.store(NowNs(), std::memory_order_release);
  slot->handed.store(slot->issued.load(std::memory_order_relaxed), std::memory_order_release);
  WorkQueue& q = Work();
  {
    std::lock_guard<std::mutex> lock(q.mu);
    q.slots.push_back(slot);
  }
  q.cv.notify_one();
}

// Takes `s` out of the worker's queue if the worker has not taken it yet: the caller then runs it.
bool ClaimQueued(Slot* s) {
  WorkQueue& q = Work();
  std::lock_guard<std::mutex> lock(q.mu);
  auto it = std::find(q.slots.begin(), q.slots.end(), s);
  if (it == q.slots.end()) return false;
  q.slots.erase(it);
  return true;
}

void EndHostFn(void* arg) {  // holds the stream until the slot has run
  Slot* s = static_cast<Slot*>(arg);
  const int64_t use = s->issued.load(std::memory_order_relaxed);  // stable: the slot is not reused before this ends
  // A slot the worker has not picked up yet (it was asleep, or its core busy: the kernel pool spins on every core
  // after a call) runs here, on the stream's callback thread, instead of waiting for the worker to wake: the
  // serial order (begin right before end) then costs no hand-off at all.
  if (ClaimQueued(s)) RunSlot(s);
  // spin a little (a short run), then sleep until the worker signals: a spinning callback thread would take a
  // core from the kernel pool for the whole run
  for (uint32_t spins = 0; spins < (1u << 12) && s->ran.load(std::memory_order_acquire) < use; ++spins)
    __asm__ volatile("pause" ::: "memory");
  if (s->ran.load(std::memory_order_acquire) < use) {
    RanSignal& signal = Ran();
    std::unique_lock<std::mutex> lock(signal.mu);
    signal.cv.wait(lock, [&] { return s->ran.load(std::memory_order_acquire) >= use; });
  }
  s->ended.store(use, std::memory_order_release);
}

// The open call an end of [T, H] ends: `named` (the CPU platform's ticket names its slot), else the oldest (CUDA:
// the stream runs begins and ends in dispatch order). "" and `out` set, or why there is none.
std::string FindOpen(int64_t T, int64_t H, Slot* named, Slot*& out) {
  auto it = named ? std::find(g_open.begin(), g_open.end(), named) : g_open.begin();
  if (it == g_open.end())
    return "streamed_cpu_end: no open streamed_cpu_begin to end (every begin is followed by one end; this one "
           "was ended or abandoned already, or never begun)";
  Slot* s = *it;
  if (s->T != T || s->hidden != H)
    return "streamed_cpu_end: the open call has " + std::to_string(s->T) + " tokens of hidden " +
           std::to_string(s->hidden) + ", this end expects " + std::to_string(T) + " x " + std::to_string(H) +
           " (begin and end must pair up in dispatch order)";
  out = s;
  return "";
}

void CloseOpen(Slot* s) { g_open.erase(std::find(g_open.begin(), g_open.end(), s)); }

ffi::Error BeginCpu(ffi::AnyBuffer packed, ffi::Result<ffi::AnyBuffer> ticket, int64_t tokens, int64_t top_k,
                    int64_t hidden) {
  std::string bad = CheckBegin(packed, *ticket, tokens, top_k, hidden);
  if (!bad.empty()) return ffi::Error::InvalidArgument(bad);
  const Packed p(tokens, top_k, hidden);
  {
    std::string err;
    if (!TablesOf(static_cast<const char*>(packed.untyped_data()), p, hidden, err))
      return ffi::Error::InvalidArgument(err);
  }
  std::lock_guard<std::mutex> lock(g_slots_mu);
  Slot& s = g_slots[g_next_slot++ % kSlots];
  const size_t off_out = Align(p.bytes);
  std::string err = Reserve(s, off_out + static_cast<size_t>(tokens) * hidden * 4, false, nullptr);
  if (!err.empty()) return ffi::Error::Internal("streamed_cpu_begin: " + err);
  s.T = tokens, s.k = top_k, s.hidden = hidden, s.off_out = off_out, s.timed = false;
  std::memcpy(s.host, packed.untyped_data(), p.bytes);
  const int64_t use = s.issued.fetch_add(1, std::memory_order_relaxed) + 1;
  RunSlot(&s);
  g_open.push_back(&s);
  // the ticket names the slot and its use: the CPU platform may run a later program before an earlier one whose
  // inputs are not ready, so the end finds its begin by ticket, not by order
  int32_t* t = static_cast<int32_t*>(ticket->untyped_data());
  t[0] = static_cast<int32_t>(&s - g_slots), t[1] = static_cast<int32_t>(use & 0x7fffffff);
  return ffi::Error::Success();
}

ffi::Error EndCpu(ffi::AnyBuffer ticket, ffi::Result<ffi::AnyBuffer> out) {
  std::string bad = fiddler::Check("streamed_cpu_end", "output", *out, ffi::DataType::F32, 2);
  if (!bad.empty()) return ffi::Error::InvalidArgument(bad);
  if (ticket.element_type() != ffi::DataType::S32 || ticket.element_count() != 2)
    return ffi::Error::InvalidArgument("streamed_cpu_end: ticket must be the int32[2] a streamed_cpu_begin made");
  const int32_t* t = static_cast<const int32_t*>(ticket.untyped_data());
  if (t[0] < 0 || t[0] >= kSlots)
    return ffi::Error::InvalidArgument("streamed_cpu_end: ticket names no slot; pass the ticket a begin made");
  std::lock_guard<std::mutex> lock(g_slots_mu);
  Slot* named = &g_slots[t[0]];
  Slot* s = nullptr;
  const bool current = (named->issued.load(std::memory_order_relaxed) & 0x7fffffff) == t[1];
  bad = FindOpen(out->dimensions()[0], out->dimensions()[1], current ? named : nullptr, s);
  if (!current || !bad.empty())
    return ffi::Error::InvalidArgument(!bad.empty() ? bad : "streamed_cpu_end: no open streamed_cpu_begin to end "
                                       "(this ticket's call was ended or abandoned already)");
  std::memcpy(out->untyped_data(), s->host + s->off_out, sizeof(float) * s->T * s->hidden);
  CloseOpen(s);
  s->ended.store(s->issued.load(std::memory_order_relaxed), std::memory_order_release);
  return ffi::Error::Success();
}

// Records event i of a timed slot on the stream (the events are created on first use).
std::string RecordEvent(const Driver& cu, Slot& s, int i, CUstream stream) {
  if (!s.events[i]) {
    CUresult r = cu.event_create(&s.events[i], 0);
    if (r != 0) return "cuEventCreate: " + cu.Describe(r);
  }
  CUresult r = cu.event_record(s.events[i], stream);
  return r == 0 ? "" : "cuEventRecord: " + cu.Describe(r);
}

// Fills a timed record's GPU times from its slot's events (call with g_records_mu held; never waits): false,
// leaving it pending, while its end has not been enqueued or its last event has not completed; an event error
// leaves the record untimed.
bool ResolveSpans(Record& rec) {
  Slot& s = *rec.pending;
  const Driver& cu = GetDriver();
  if (s.events_use.load(std::memory_order_acquire) != rec.use) return false;
  ContextGuard guard(cu, s.stream, s.ctx);
  if (!guard.error.empty()) {
    rec.pending = nullptr;
    return true;
  }
  CUresult r = cu.event_query(s.events[3]);
  if (r == 600 /* CUDA_ERROR_NOT_READY */) return false;
  rec.pending = nullptr;
  float ms[kEvents] = {0, 0, 0, 0};
  for (int i = 1; i < kEvents && r == 0; ++i) r = cu.event_elapsed(&ms[i], s.events[0], s.events[i]);
  if (r != 0) return true;
  // begin's host function ran just after event 1 (the input copy landed): that anchors the events on the host clock
  const double t0 = static_cast<double>(s.landed_ns.load(std::memory_order_acquire)) - ms[1] * 1e6;
  for (int i = 0; i < kEvents; ++i) rec.gpu_ns[i] = static_cast<int64_t>(t0 + ms[i] * 1e6);
  return true;
}

ffi::Error BeginCuda(CUstream stream, ffi::AnyBuffer packed, ffi::Result<ffi::AnyBuffer> ticket, int64_t tokens,
                     int64_t top_k, int64_t hidden) {
  std::string bad = CheckBegin(packed, *ticket, tokens, top_k, hidden);
  if (!bad.empty()) return ffi::Error::InvalidArgument(bad);
  const Driver& cu = GetDriver();
  if (!cu.missing.empty()) return ffi::Error::Internal("streamed_cpu_begin: " + cu.missing);
  ContextGuard guard(cu, stream);
  if (!guard.error.empty()) return ffi::Error::Internal("streamed_cpu_begin: " + guard.error);
  StartWorker();
  const Packed p(tokens, top_k, hidden);
  std::lock_guard<std::mutex> lock(g_slots_mu);
  Slot& s = g_slots[g_next_slot++ % kSlots];
  const size_t off_out = Align(p.bytes);
  std::string err = Reserve(s, off_out + static_cast<size_t>(tokens) * hidden * 4, true, &cu);
  if (!err.empty()) return ffi::Error::Internal("streamed_cpu_begin: " + err);
  s.T = tokens, s.k = top_k, s.hidden = hidden, s.off_out = off_out;
  s.timed = g_timing.load(std::memory_order_relaxed);
  s.ctx = guard.ctx, s.stream = stream;
  if (s.timed && !(err = RecordEvent(cu, s, 0, stream)).empty())
    return ffi::Error::Internal("streamed_cpu_begin: " + err);
  CUresult r = cu.memcpy_dtoh(s.host, reinterpret_cast<CUdeviceptr>(packed.untyped_data()), p.bytes, stream);
  if (r != 0) return ffi::Error::Internal("streamed_cpu_begin: cuMemcpyDtoHAsync: " + cu.Describe(r));
  if (s.timed && !(err = RecordEvent(cu, s, 1, stream)).empty())
    return ffi::Error::Internal("streamed_cpu_begin: " + err);
  s.issued.fetch_add(1, std::memory_order_relaxed);
  if ((r = cu.launch_host_func(stream, BeginHostFn, &s)) != 0) {
    s.issued.fetch_sub(1, std::memory_order_relaxed);
    return ffi::Error::Internal("streamed_cpu_begin: cuLaunchHostFunc: " + cu.Describe(r));
  }
  g_open.push_back(&s);
  return ffi::Error::Success();
}

ffi::Error EndCuda(CUstream stream, ffi::AnyBuffer ticket, ffi::Result<ffi::AnyBuffer> out) {
  std::string bad = fiddler::Check("streamed_cpu_end", "output", *out, ffi::DataType::F32, 2);
  if (!bad.empty()) return ffi::Error::InvalidArgument(bad);
  (void)ticket;
  const Driver& cu = GetDriver();
  if (!cu.missing.empty()) return ffi::Error::Internal("streamed_cpu_end: " + cu.missing);
  ContextGuard guard(cu, stream);
  if (!guard.error.empty()) return ffi::Error::Internal("streamed_cpu_end: " + guard.error);
  std::lock_guard<std::mutex> lock(g_slots_mu);
  Slot* s = nullptr;
  bad = FindOpen(out->dimensions()[0], out->dimensions()[1], nullptr, s);
  if (!bad.empty()) return ffi::Error::InvalidArgument(bad);
  // the call stays open (abandon can free it) until its wait is queued: from then on that wait ends it
  std::string err;
  if (s->timed && !(err = RecordEvent(cu, *s, 2, stream)).empty())
    return ffi::Error::Internal("streamed_cpu_end: " + err);
  CUresult r = cu.launch_host_func(stream, EndHostFn, s);
  if (r != 0) return ffi::Error::Internal("streamed_cpu_end: cuLaunchHostFunc: " + cu.Describe(r));
  CloseOpen(s);
  r = cu.memcpy_htod(reinterpret_cast<CUdeviceptr>(out->untyped_data()), s->host + s->off_out,
                     sizeof(float) * s->T * s->hidden, stream);
  if (r != 0) return ffi::Error::Internal("streamed_cpu_end: cuMemcpyHtoDAsync: " + cu.Describe(r));
  if (s->timed) {
    if (!(err = RecordEvent(cu, *s, 3, stream)).empty()) return ffi::Error::Internal("streamed_cpu_end: " + err);
    s->events_use.store(s->issued.load(std::memory_order_relaxed), std::memory_order_release);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FiddlerStreamedBeginCpu, BeginCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("tokens")
                                  .Attr<int64_t>("top_k")
                                  .Attr<int64_t>("hidden"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FiddlerStreamedEndCpu, EndCpu,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FiddlerStreamedBeginCuda, BeginCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<CUstream>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("tokens")
                                  .Attr<int64_t>("top_k")
                                  .Attr<int64_t>("hidden"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FiddlerStreamedEndCuda, EndCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<CUstream>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

extern "C" {

int64_t fj_streamed_lane_register(int64_t E, int64_t hidden, int64_t ffn, int format, int64_t group1,
                                  int64_t group2, const uint64_t* w1, const uint64_t* s1, const uint64_t* w3,
                                  const uint64_t* s3, const uint64_t* w2, const uint64_t* s2) {
  if (E < 1 || E > kFjStreamedMaxExperts) return -2;  // the records' counts hold kFjStreamedMaxExperts
  if (format < 0 || format > 2) return -3;
  auto t = std::make_shared<LayerTables>();
  t->E = E, t->hidden = hidden, t->ffn = ffn;
  t->format = static_cast<fiddler::WeightFormat>(format), t->group1 = group1, t->group2 = group2;
  const bool quantised = format != 0;
  auto at = [](const uint64_t* table, int64_t e) {
    return table ? reinterpret_cast<const void*>(static_cast<uintptr_t>(table[e])) : nullptr;
  };
  for (int64_t e = 0; e < E; ++e) {
    t->w1.push_back(at(w1, e)), t->w3.push_back(at(w3, e)), t->w2.push_back(at(w2, e));
    t->s1.push_back(at(s1, e)), t->s3.push_back(at(s3, e)), t->s2.push_back(at(s2, e));
    bool any = t->w1[e] || t->w3[e] || t->w2[e], all = t->w1[e] && t->w3[e] && t->w2[e];
    if (quantised) all = all && t->s1[e] && t->s3[e] && t->s2[e];
    if (any && !all) return -1;  // an expert is on the host with all its matrices (and scales) or not at all
  }
  std::lock_guard<std::mutex> lock(g_tables_mu);
  g_tables.push_back(std::move(t));
  return static_cast<int64_t>(g_tables.size()) - 1;
}

void fj_streamed_lane_unregister(int64_t id) {
  std::lock_guard<std::mutex> lock(g_tables_mu);
  if (id >= 0 && id < static_cast<int64_t>(g_tables.size())) g_tables[id] = nullptr;
}

int fj_streamed_lane_error(char* err, int err_len) {
  std::lock_guard<std::mutex> lock(g_error_mu);
  if (g_error.empty()) return 0;
  std::snprintf(err, err_len, "%s", g_error.c_str());
  g_error.clear();
  return -1;
}

int64_t fj_streamed_lane_records(FjStreamedRecord* out, int64_t capacity, int64_t* dropped) {
  std::lock_guard<std::mutex> lock(g_records_mu);
  AbsorbIncoming();
  int64_t n = std::min<int64_t>(capacity, g_records.size());
  for (int64_t i = 0; i < n; ++i) {
    Record& r = g_records.front();
    if (r.pending && !ResolveSpans(r)) {  // its GPU work is still queued: keep it for later
      n = i;
      break;
    }
    FjStreamedRecord& o = out[i];
    o = FjStreamedRecord{};
    o.tables = r.tables, o.tokens = r.tokens, o.assignments = r.assignments, o.start_ns = r.start_ns,
    o.end_ns = r.end_ns;
    o.experts = static_cast<int64_t>(r.counts.size());
    std::copy(r.counts.begin(), r.counts.end(), o.counts);
    std::copy(r.gpu_ns, r.gpu_ns + 4, o.gpu_ns);
    g_records.pop_front();
  }
  {
    std::lock_guard<std::mutex> incoming(g_incoming_mu);
    *dropped = g_records_dropped;
    g_records_dropped = 0;
  }
  return n;
}

int64_t fj_monotonic_ns(void) { return NowNs(); }

int64_t fj_streamed_lane_abandon(void) {
  std::lock_guard<std::mutex> lock(g_slots_mu);
  int64_t n = 0;
  for (Slot* s : g_open) {
    WaitUse(*s, s->ran);  // the stream reaches its begin by itself, unless it failed
    SettleSpans(*s, /*resolve=*/false);  // its end never came: its record has no GPU times
    s->ended.store(s->issued.load(std::memory_order_relaxed), std::memory_order_release);
    ++n;
  }
  g_open.clear();
  return n;
}

void fj_streamed_lane_set_timing(int on) { g_timing.store(on != 0); }

}  // extern "C"
