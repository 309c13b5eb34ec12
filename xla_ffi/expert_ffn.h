// The expert FFN compute API: raw pointers in, raw pointers out, no XLA types. Used by the XLA FFI handlers
// (ffi_handlers.cc), the C API for Python/cffi (capi.cc), and reusable from a future CUDA-platform bridge.
// All functions return nullptr on success or an error message naming the offending argument (a pointer to
// a thread-local buffer, valid until the next call on the same thread).
#pragma once

#include <cstdint>

#include "kernels.h"

namespace fiddler {

// y [n, hidden] (bf16, or fp32 if out_f32) = (silu(x w1^T) * (x w3^T)) w2^T for one expert.
// x [n, hidden] bf16; w1, w3 [ffn, hidden] bf16; w2 [hidden, ffn] bf16 (HF layouts, row-major).
const char* ExpertFfn(const uint16_t* x, int64_t n, int64_t hidden, int64_t ffn, const uint16_t* w1,
                      const uint16_t* w3, const uint16_t* w2, void* y, bool out_f32);

// y [T, hidden] = sum over assignments a of weights[a] * FFN_{expert_idx[a]}(x[token_idx[a]]); rows of y that
// no assignment touches are zero. x [T, hidden]; w1, w3 [E, ffn, hidden]; w2 [E, hidden, ffn]. The sum over
// a token's assignments runs in assignment order, so the result is independent of the thread count.
const char* GroupedExpertFfn(const uint16_t* x, int64_t T, int64_t hidden, int64_t ffn, int64_t E,
                             const int32_t* token_idx, const int32_t* expert_idx, const float* weights,
                             int64_t A, const uint16_t* w1, const uint16_t* w3, const uint16_t* w2, void* y,
                             bool out_f32);

// GroupedExpertFfn with the experts' weights given as tables of E pointers (w1[e], w3[e] [ffn, hidden],
// w2[e] [hidden, ffn]): experts held in separate allocations (the engine's pinned host buffers), at a weight
// format (kernels.h): bfloat16 (scale tables unused, may be null), int8 or int4, with tables of each matrix's
// scales; group1 / group2: int4's inputs per scale in w1 / w3 (rows of hidden) and in w2 (rows of ffn).
// Quantised calls run on AVX512_BF16 where the CPU has it, else generic. A null entry is allowed for experts
// that no assignment uses; an assignment to one is an error.
const char* GroupedExpertFfnTables(const uint16_t* x, int64_t T, int64_t hidden, int64_t ffn, int64_t E,
                                   const int32_t* token_idx, const int32_t* expert_idx, const float* weights,
                                   int64_t A, WeightFormat format, int64_t group1, int64_t group2,
                                   const void* const* w1, const void* const* s1, const void* const* w3,
                                   const void* const* s3, const void* const* w2, const void* const* s2, void* y,
                                   bool out_f32);

// Configuration (all thread-safe; they wait for a running call to finish).
// Forces a path (kAuto = choose by n and CPU). Returns false if the CPU cannot run it.
bool SetForcedPath(Path path);
Path GetForcedPath();
// The path a call with n tokens would use now.
Path PathForTokens(int64_t n);
bool PathSupported(Path path);
const char* PathName(Path path);
// Token count from which quantised experts run dense (rows dequantised to bf16 blocks, then the bf16 path the
// call would choose: AMX or AVX512_BF16); < 0: auto (the AMX threshold on an AMX CPU, else never).
void SetQuantDenseMinTokens(int64_t n);
// Token count from which the automatic choice uses AMX (when present).
void SetAmxMinTokens(int64_t n);
int64_t GetAmxMinTokens();
// Thread count (<= 0: physical cores) and pinning of pool threads to one CPU per physical core (pin < 0: as it
// is). The pool is rebuilt now: an error (a count above MaxThreads(), or threads that cannot start) keeps the
// previous settings.
const char* SetNumThreads(int64_t n, int pin);
// The thread count back to the start-up default (FIDDLER_KERNEL_THREADS, else physical cores; a refused value is
// reported by every call that needs the pool, as at start-up), the pinning as it is.
const char* ResetNumThreads();
// The most threads SetNumThreads and FIDDLER_KERNEL_THREADS accept: max(64, 8 x logical CPUs).
int MaxThreads();
// The pool's size (starting it if needed), or -1 and *err when it cannot start.
int GetNumThreads(const char** err);
// The pool's spin before its workers sleep (microseconds, at most 1 s) and, for comparison, its old contract
// (every worker joins every phase). A value < 0 leaves that knob unchanged; the pool is rebuilt now.
// streamed_spin_us: the spin after a call made inside a StreamedCallScope (-1: spin_us; < -1: unchanged).
const char* SetPool(int64_t spin_us, int wait_all, int64_t streamed_spin_us);

// While one lives, the calls its thread makes leave the pool spinning for streamed_spin_us afterwards: the
// streamed CPU lane's calls come one per layer, closer together than a short spin bridges.
class StreamedCallScope {
 public:
  StreamedCallScope();
  ~StreamedCallScope();
  StreamedCallScope(const StreamedCallScope&) = delete;
  StreamedCallScope& operator=(const StreamedCallScope&) = delete;

 private:
  int saved_;
};
void SetPrefetchBytes(int bytes);
// Reads `bytes` at p with the kernel's thread pool (each thread a contiguous slice) and stores a checksum in *sum:
// the STREAM-like read bandwidth bar the benchmark compares the kernel against.
const char* ReadProbe(const void* const* p, const int64_t* bytes, int64_t n, uint64_t* sum);
void SetAmxGroupKib(int kib);
void SetAmxVariant(int variant);  // 0 auto, 1 direct, 2 k-chunked, 3 blocked
// AMX tuning: the blocked variant's k-blocks per chunk, rows per m-block, token tiles per pass, weight-panel
// prefetch, the token-tile count from which auto uses it, and the pipelined 2x2 micro-kernel. A value < 0
// leaves that knob unchanged.
void SetAmxBlocking(int kc, int mb, int pass, int prefetch, int blocked_from, int pipeline);

}  // namespace fiddler
