/* Plain-C entry points of the kernel library, as declared to cffi (fiddler_jax/kernels/_build.py keeps the
   same declarations in its cdef). The two XLA FFI handlers are the custom-call targets registered with JAX;
   the fj_* functions configure the runtime and run the compute functions on raw buffers (tests, tools). */
#ifndef FIDDLER_XLA_FFI_CAPI_H_
#define FIDDLER_XLA_FFI_CAPI_H_

#include <stdint.h>

#include "xla/ffi/api/c_api.h"

#ifdef __cplusplus
extern "C" {
#endif

/* XLA FFI handlers (platform "cpu"). */
XLA_FFI_Error* FiddlerExpertFfn(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FiddlerGroupedExpertFfn(XLA_FFI_CallFrame* call_frame);
/* The streamed CPU lane (streamed_lane.cc): one handler per platform, "cpu" and "CUDA". */
XLA_FFI_Error* FiddlerStreamedBeginCpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FiddlerStreamedEndCpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FiddlerStreamedBeginCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FiddlerStreamedEndCuda(XLA_FFI_CallFrame* call_frame);

/* Feature bits for fj_cpu_feature_bits. */
enum {
  FJ_AVX2 = 1 << 0, FJ_FMA = 1 << 1, FJ_F16C = 1 << 2, FJ_AVX512F = 1 << 3, FJ_AVX512BW = 1 << 4,
  FJ_AVX512VL = 1 << 5, FJ_AVX512DQ = 1 << 6, FJ_AVX512_BF16 = 1 << 7, FJ_AMX_TILE = 1 << 8,
  FJ_AMX_BF16 = 1 << 9, FJ_OS_AVX = 1 << 10, FJ_OS_AVX512 = 1 << 11, FJ_AMX_PERMITTED = 1 << 12
};

int fj_cpu_feature_bits(void);
int fj_physical_cores(void);
int fj_logical_cpus(void);

/* Paths: 0 auto, 1 generic, 2 avx2, 3 avx512_bf16, 4 amx. */
int fj_path_supported(int path);
int fj_set_path(int path); /* 0 on success, -1 if unsupported */
int fj_get_path(void);
int fj_path_for_tokens(int64_t n);
void fj_set_amx_min_tokens(int64_t n);
void fj_set_quant_dense_min_tokens(int64_t n);
int64_t fj_get_amx_min_tokens(void);
/* The thread pool: these return 0 on success, else -1 and the message in err (a count above fj_max_threads(), a
   refused FIDDLER_KERNEL_THREADS, threads that cannot start); fj_get_num_threads returns the size or -1. */
int fj_set_num_threads(int64_t n, int pin, char* err, int err_len); /* n <= 0: physical cores; pin < 0: kept */
int fj_reset_num_threads(char* err, int err_len);                   /* FIDDLER_KERNEL_THREADS's count again */
int fj_max_threads(void);
int fj_get_num_threads(char* err, int err_len);
/* spin_us, wait_all < 0: unchanged; streamed_spin_us (after a streamed-lane call): -1 = spin_us, < -1 unchanged */
int fj_set_pool(int64_t spin_us, int wait_all, int64_t streamed_spin_us, char* err, int err_len);
void fj_set_prefetch_bytes(int bytes);
void fj_set_amx_group_kib(int kib);
void fj_set_amx_variant(int variant);
void fj_set_amx_blocking(int kc, int mb, int pass, int prefetch, int blocked_from,
                         int pipeline); /* < 0: unchanged */
/* Multi-threaded read of p (the bandwidth bar): 0 and the checksum in *sum, else -1 and the message. */
int fj_read_probe(const uint64_t* p, const int64_t* bytes, int64_t n, uint64_t* sum, char* err, int err_len);

/* Compute on raw buffers; 0 on success, else -1 and the message in err (NUL-terminated, truncated). */
int fj_expert_ffn(const uint16_t* x, int64_t n, int64_t hidden, int64_t ffn, const uint16_t* w1,
                  const uint16_t* w3, const uint16_t* w2, void* y, int out_f32, char* err, int err_len);
int fj_grouped_expert_ffn(const uint16_t* x, int64_t T, int64_t hidden, int64_t ffn, int64_t E,
                          const int32_t* token_idx, const int32_t* expert_idx, const float* weights, int64_t A,
                          const uint16_t* w1, const uint16_t* w3, const uint16_t* w2, void* y, int out_f32,
                          char* err, int err_len);
/* The same with per-expert weights: w1, w3, w2 are tables of E addresses (0 for experts no assignment uses), at
   weight format `format` (0 bf16, 1 int8, 2 int4: xla_ffi/kernels.h); s1, s3, s2: tables of the experts' scales
   (quantised formats; NULL for bf16); group1, group2: int4's inputs per scale in w1 / w3 and in w2. */
int fj_grouped_expert_ffn_tables(const uint16_t* x, int64_t T, int64_t hidden, int64_t ffn, int64_t E,
                                 const int32_t* token_idx, const int32_t* expert_idx, const float* weights,
                                 int64_t A, int format, int64_t group1, int64_t group2, const uint64_t* w1,
                                 const uint64_t* s1, const uint64_t* w3, const uint64_t* s3, const uint64_t* w2,
                                 const uint64_t* s2, void* y, int out_f32, char* err, int err_len);

/* The streamed CPU lane's layers: tables of E addresses (0 for GPU-resident experts) at a weight format, with
   scale tables and groups as fj_grouped_expert_ffn_tables; returns the id the custom call names, -1 when an
   expert has some but not all of its matrices (and scales), -2 when E is not in [1, kFjStreamedMaxExperts], -3
   for an unknown format. */
int64_t fj_streamed_lane_register(int64_t E, int64_t hidden, int64_t ffn, int format, int64_t group1,
                                  int64_t group2, const uint64_t* w1, const uint64_t* s1, const uint64_t* w3,
                                  const uint64_t* s3, const uint64_t* w2, const uint64_t* s2);
void fj_streamed_lane_unregister(int64_t id);
/* The first error of a host function since the last call (then cleared): -1 and the message, else 0. */
int fj_streamed_lane_error(char* err, int err_len);
/* One record per streamed call (for the engine's trace): moves up to `capacity` of them to out, oldest first.
   counts[e] for e < experts (the layer's expert count) are the tokens routed to expert e (saturating at 65535);
   the rest are zero. gpu_ns: a timed CUDA call's events (before and after its input copy, before end's wait,
   after the output copy) on CLOCK_MONOTONIC, all 0 when untimed. */
enum { kFjStreamedMaxExperts = 256 };
typedef struct FjStreamedRecord {
  int64_t tables, tokens, assignments, experts, start_ns, end_ns; /* CLOCK_MONOTONIC */
  uint16_t counts[256];                                            /* kFjStreamedMaxExperts */
  int64_t gpu_ns[4];
} FjStreamedRecord;
int64_t fj_streamed_lane_records(FjStreamedRecord* out, int64_t capacity, int64_t* dropped);
int64_t fj_monotonic_ns(void);
/* Forget the begun calls no end will follow (a forward pass that raised between them): waits until each has run,
   frees its slot; returns how many there were. */
int64_t fj_streamed_lane_abandon(void);
/* Record CUDA events around each call from now on (on != 0), for the records' gpu_ns. */
void fj_streamed_lane_set_timing(int on);

#ifdef __cplusplus
}
#endif

#endif /* FIDDLER_XLA_FFI_CAPI_H_ */
