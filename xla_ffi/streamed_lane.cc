// The streamed CPU lane: one layer step's CPU-lane experts as an XLA custom call, so a decode step needs no host
// sync. Algorithm, for one call (x [T, hidden] bf16, experts/weights [T, k] the step's routing, `tables` the id
// of a registered layer):
//   1. the assignments (t, experts[t, j], weights[t, j]) whose expert the layer's table holds on the host are
//      kept (the others are GPU-resident: the engine's resident mix covers them);
//   2. out [T, hidden] float32 = their grouped expert FFN (GroupedExpertFfnTables over the pinned weights),
//      zero where a token has none.
// On the "cpu" platform the call runs step 2 in place. On "CUDA" it is queued on XLA's stream, where the host
// cannot wait for anything: the inputs are copied into a pinned staging slot (cuMemcpyDtoHAsync), a host
// function runs steps 1-2 when the stream reaches it (cuLaunchHostFunc), and the output is copied back
// (cuMemcpyHtoDAsync). The stream thus orders attention -> CPU experts -> next layer by itself, and the Python
// thread queues whole tokens ahead. The CUDA driver is found at run time (dlopen of libcuda.so.1, which JAX has
// loaded), so this file needs no CUDA headers and the library still loads on machines without a GPU.
// A host function cannot return an error to XLA: its first error is kept (fj_streamed_lane_error) and its output
// is zero; the engine checks after each forward pass and raises.
// Each call leaves a record (fj_streamed_lane_records): its tokens, the assignments the CPU ran, its span and the
// tokens routed to each of the layer's experts. A layer registers with at most kFjStreamedMaxExperts (256)
// experts, the size of the C record's counts; the ring keeps each record's counts at the layer's own size, so
// its memory follows the model (8192 records of a 128-expert layer: under 3 MB).
#include <dlfcn.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
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

namespace {

// -- registered layers ----------------------------------------------------------------------------------------
struct LayerTables {
  int64_t E = 0, hidden = 0, ffn = 0;
  std::vector<const uint16_t*> w1, w3, w2;  // null: the expert is not on the host (GPU-resident)
};

std::mutex g_tables_mu;
std::vector<std::shared_ptr<const LayerTables>> g_tables;  // by id

std::shared_ptr<const LayerTables> FindTables(int64_t id) {
  std::lock_guard<std::mutex> lock(g_tables_mu);
  if (id < 0 || id >= static_cast<int64_t>(g_tables.size())) return nullptr;
  return g_tables[id];
}

// -- records (the engine's trace) and the first host-side error ------------------------------------------------
struct Record {
  int64_t tables = 0, tokens = 0, assignments = 0, start_ns = 0, end_ns = 0;
  std::vector<uint16_t> counts;  // one per expert of the layer
};

constexpr size_t kRecordRing = 8192;
std::mutex g_records_mu;
std::deque<Record> g_records;  // at most kRecordRing, oldest dropped
int64_t g_records_dropped = 0;

std::mutex g_error_mu;
std::string g_error;

void SetError(const std::string& msg) {
  std::lock_guard<std::mutex> lock(g_error_mu);
  if (g_error.empty()) g_error = msg;
}

int64_t NowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// Steps 1-2 of the file comment for the layer registered under `id`. Returns nullptr or an error message
// (thread-local storage).
const char* RunLane(int64_t id, const LayerTables* tables, const uint16_t* x, int64_t T, int64_t k,
                    const int32_t* experts, const float* weights, float* out) {
  static thread_local std::string msg;
  int64_t start = NowNs();
  Record rec;
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
    err = fiddler::GroupedExpertFfnTables(x, T, tables->hidden, tables->ffn, tables->E, tok.data(), exp.data(),
                                          wts.data(), rec.assignments, tables->w1.data(), tables->w3.data(),
                                          tables->w2.data(), out, /*out_f32=*/true);
  }
  rec.start_ns = start;
  rec.end_ns = NowNs();
  {
    std::lock_guard<std::mutex> lock(g_records_mu);
    if (g_records.size() >= kRecordRing) {
      g_records.pop_front();
      ++g_records_dropped;
    }
    g_records.push_back(std::move(rec));
  }
  return err;
}

// Checks the call's buffers against the layer registered under `id`: sets `tables` to it and returns "", or
// returns an error message.
std::string CheckCall(const ffi::AnyBuffer& x, const ffi::AnyBuffer& experts, const ffi::AnyBuffer& weights,
                      const ffi::AnyBuffer& out, int64_t id, std::shared_ptr<const LayerTables>& tables) {
  const char* op = "streamed_cpu_mix";
  tables = FindTables(id);
  if (!tables) return std::string(op) + ": no layer tables registered under id " + std::to_string(id);
  std::string e;
  if (!(e = fiddler::Check(op, "x", x, ffi::DataType::BF16, 2)).empty()) return e;
  if (!(e = fiddler::Check(op, "experts", experts, ffi::DataType::S32, 2)).empty()) return e;
  if (!(e = fiddler::Check(op, "weights", weights, ffi::DataType::F32, 2)).empty()) return e;
  if (!(e = fiddler::Check(op, "output", out, ffi::DataType::F32, 2)).empty()) return e;
  auto xd = x.dimensions(), ed = experts.dimensions(), wd = weights.dimensions(), od = out.dimensions();
  if (xd[1] != tables->hidden)
    return std::string(op) + ": x has hidden size " + std::to_string(xd[1]) + ", the layer's experts " +
           std::to_string(tables->hidden);
  if (ed[0] != xd[0])
    return std::string(op) + ": experts has shape " + fiddler::Shape(experts) + " but x has " + fiddler::Shape(x);
  if (wd[0] != ed[0] || wd[1] != ed[1])
    return std::string(op) + ": weights has shape " + fiddler::Shape(weights) + ", expected " +
           fiddler::Shape(experts) + " like experts";
  if (od[0] != xd[0] || od[1] != xd[1])
    return std::string(op) + ": output has shape " + fiddler::Shape(out) + ", expected " + fiddler::Shape(x);
  return "";
}

ffi::Error CpuImpl(ffi::AnyBuffer x, ffi::AnyBuffer experts, ffi::AnyBuffer weights,
                   ffi::Result<ffi::AnyBuffer> out, int64_t tables) {
  std::shared_ptr<const LayerTables> layer;
  std::string bad = CheckCall(x, experts, weights, *out, tables, layer);
  if (!bad.empty()) return ffi::Error::InvalidArgument(bad);
  const char* err = RunLane(tables, layer.get(), static_cast<const uint16_t*>(x.untyped_data()), x.dimensions()[0],
                            experts.dimensions()[1], static_cast<const int32_t*>(experts.untyped_data()),
                            static_cast<const float*>(weights.untyped_data()),
                            static_cast<float*>(out->untyped_data()));
  if (err) return ffi::Error::Internal(err);
  return ffi::Error::Success();
}

// -- CUDA: the driver API, found at run time ------------------------------------------------------------------
using CUresult = int;
using CUdeviceptr = unsigned long long;
using CUstream = CUstream_st*;
using CUcontext = CUctx_st*;
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
    get(d.error_string, "cuGetErrorString");
    return d;
  }();
  return driver;
}

// One call's pinned staging: [x bf16 T*H | experts int32 T*k | weights f32 T*k | out f32 T*H], 64-byte aligned
// parts. A ring of slots: a slot is reused only after its host function has run (the calls are queued on one
// stream, so its output copy is ordered before the next use's input copies). A slot that must grow keeps its old
// buffer (the output copy of its last use may still be queued): bounded, since sizes only grow.
struct Slot {
  char* host = nullptr;
  size_t capacity = 0;
  std::vector<char*> retired;
  int64_t tables = 0, T = 0, k = 0, hidden = 0;
  std::shared_ptr<const LayerTables> layer;  // held until the host function has run
  size_t off_experts = 0, off_weights = 0, off_out = 0;
  std::atomic<int64_t> issued{0}, done{0};
};

constexpr int kSlots = 128;
Slot g_slots[kSlots];
std::mutex g_slots_mu;  // one enqueuing thread at a time
int64_t g_next_slot = 0;

size_t Align(size_t n) { return (n + 63) / 64 * 64; }

void HostFunction(void* arg) {
  Slot* s = static_cast<Slot*>(arg);
  const char* err = RunLane(s->tables, s->layer.get(), reinterpret_cast<const uint16_t*>(s->host), s->T, s->k,
                            reinterpret_cast<const int32_t*>(s->host + s->off_experts),
                            reinterpret_cast<const float*>(s->host + s->off_weights),
                            reinterpret_cast<float*>(s->host + s->off_out));
  if (err) {
    SetError(err);
    std::memset(s->host + s->off_out, 0, sizeof(float) * s->T * s->hidden);
  }
  s->layer.reset();
  s->done.store(s->issued.load(std::memory_order_relaxed), std::memory_order_release);
}

ffi::Error CudaImpl(CUstream stream, ffi::AnyBuffer x, ffi::AnyBuffer experts, ffi::AnyBuffer weights,
                    ffi::Result<ffi::AnyBuffer> out, int64_t tables) {
  std::shared_ptr<const LayerTables> layer;
  std::string bad = CheckCall(x, experts, weights, *out, tables, layer);
  if (!bad.empty()) return ffi::Error::InvalidArgument(bad);
  const Driver& cu = GetDriver();
  if (!cu.missing.empty()) return ffi::Error::Internal("streamed_cpu_mix: " + cu.missing);
  const int64_t T = x.dimensions()[0], H = x.dimensions()[1], k = experts.dimensions()[1];

  CUcontext ctx = nullptr;
  bool pushed = false;
  if (cu.ctx_get_current(&ctx) != 0 || ctx == nullptr) {
    CUresult r = cu.stream_get_ctx(stream, &ctx);
    if (r != 0) return ffi::Error::Internal("streamed_cpu_mix: cuStreamGetCtx: " + cu.Describe(r));
    r = cu.ctx_push(ctx);
    if (r != 0) return ffi::Error::Internal("streamed_cpu_mix: cuCtxPushCurrent: " + cu.Describe(r));
    pushed = true;
  }
  auto fail = [&](const char* what, CUresult r) {
    if (pushed) cu.ctx_pop(&ctx);
    return ffi::Error::Internal(std::string("streamed_cpu_mix: ") + what + ": " + cu.Describe(r));
  };

  std::lock_guard<std::mutex> lock(g_slots_mu);
  Slot& s = g_slots[g_next_slot++ % kSlots];
  // Wait until the slot's previous host function has run: the stream gets there without us.
  while (s.done.load(std::memory_order_acquire) < s.issued.load(std::memory_order_relaxed))
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  const size_t x_bytes = static_cast<size_t>(T) * H * 2, idx_bytes = static_cast<size_t>(T) * k * 4;
  s.off_experts = Align(x_bytes);
  s.off_weights = s.off_experts + Align(idx_bytes);
  s.off_out = s.off_weights + Align(idx_bytes);
  const size_t need = s.off_out + static_cast<size_t>(T) * H * 4;
  if (need > s.capacity) {
    void* p = nullptr;
    size_t grow = std::max(need, 2 * s.capacity);
    CUresult r = cu.mem_host_alloc(&p, grow, 0);
    if (r != 0) return fail("cuMemHostAlloc", r);
    if (s.host) s.retired.push_back(s.host);
    s.host = static_cast<char*>(p), s.capacity = grow;
  }
  s.tables = tables, s.T = T, s.k = k, s.hidden = H, s.layer = std::move(layer);
  CUresult r;
  if ((r = cu.memcpy_dtoh(s.host, reinterpret_cast<CUdeviceptr>(x.untyped_data()), x_bytes, stream)))
    return fail("cuMemcpyDtoHAsync", r);
  if ((r = cu.memcpy_dtoh(s.host + s.off_experts, reinterpret_cast<CUdeviceptr>(experts.untyped_data()),
                          idx_bytes, stream)))
    return fail("cuMemcpyDtoHAsync", r);
  if ((r = cu.memcpy_dtoh(s.host + s.off_weights, reinterpret_cast<CUdeviceptr>(weights.untyped_data()),
                          idx_bytes, stream)))
    return fail("cuMemcpyDtoHAsync", r);
  s.issued.fetch_add(1, std::memory_order_relaxed);
  if ((r = cu.launch_host_func(stream, HostFunction, &s))) {
    s.issued.fetch_sub(1, std::memory_order_relaxed);
    return fail("cuLaunchHostFunc", r);
  }
  if ((r = cu.memcpy_htod(reinterpret_cast<CUdeviceptr>(out->untyped_data()), s.host + s.off_out,
                          static_cast<size_t>(T) * H * 4, stream)))
    return fail("cuMemcpyHtoDAsync", r);
  if (pushed) cu.ctx_pop(&ctx);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FiddlerStreamedLaneCpu, CpuImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("tables"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FiddlerStreamedLaneCuda, CudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<CUstream>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("tables"));

extern "C" {

int64_t fj_streamed_lane_register(int64_t E, int64_t hidden, int64_t ffn, const uint64_t* w1, const uint64_t* w3,
                                  const uint64_t* w2) {
  if (E < 1 || E > kFjStreamedMaxExperts) return -2;  // the records' counts hold kFjStreamedMaxExperts
  auto t = std::make_shared<LayerTables>();
  t->E = E, t->hidden = hidden, t->ffn = ffn;
  for (int64_t e = 0; e < E; ++e) {
    t->w1.push_back(reinterpret_cast<const uint16_t*>(w1[e]));
    t->w3.push_back(reinterpret_cast<const uint16_t*>(w3[e]));
    t->w2.push_back(reinterpret_cast<const uint16_t*>(w2[e]));
    bool any = t->w1[e] || t->w3[e] || t->w2[e], all = t->w1[e] && t->w3[e] && t->w2[e];
    if (any && !all) return -1;  // an expert is on the host with all three matrices or not at all
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
  int64_t n = std::min<int64_t>(capacity, g_records.size());
  for (int64_t i = 0; i < n; ++i) {
    const Record& r = g_records.front();
    FjStreamedRecord& o = out[i];
    o = FjStreamedRecord{};
    o.tables = r.tables, o.tokens = r.tokens, o.assignments = r.assignments, o.start_ns = r.start_ns,
    o.end_ns = r.end_ns;
    o.experts = static_cast<int64_t>(r.counts.size());
    std::copy(r.counts.begin(), r.counts.end(), o.counts);
    g_records.pop_front();
  }
  *dropped = g_records_dropped;
  g_records_dropped = 0;
  return n;
}

int64_t fj_monotonic_ns(void) { return NowNs(); }

}  // extern "C"
