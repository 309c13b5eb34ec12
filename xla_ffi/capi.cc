#include "capi.h"

#include <cstdio>

#include "cpu_features.h"
#include "expert_ffn.h"

using fiddler::Path;

namespace {

int Report(const char* msg, char* err, int err_len) {
  if (!msg) return 0;
  if (err && err_len > 0) std::snprintf(err, static_cast<size_t>(err_len), "%s", msg);
  return -1;
}

bool ValidPath(int p) { return p >= 0 && p < fiddler::kNumPaths; }

}  // namespace

extern "C" {

int fj_cpu_feature_bits(void) {
  const fiddler::CpuFeatures& f = fiddler::GetCpuFeatures();
  int b = 0;
  b |= f.avx2 ? FJ_AVX2 : 0;
  b |= f.fma ? FJ_FMA : 0;
  b |= f.f16c ? FJ_F16C : 0;
  b |= f.avx512f ? FJ_AVX512F : 0;
  b |= f.avx512bw ? FJ_AVX512BW : 0;
  b |= f.avx512vl ? FJ_AVX512VL : 0;
  b |= f.avx512dq ? FJ_AVX512DQ : 0;
  b |= f.avx512_bf16 ? FJ_AVX512_BF16 : 0;
  b |= f.amx_tile ? FJ_AMX_TILE : 0;
  b |= f.amx_bf16 ? FJ_AMX_BF16 : 0;
  b |= f.os_avx ? FJ_OS_AVX : 0;
  b |= f.os_avx512 ? FJ_OS_AVX512 : 0;
  b |= f.amx_permitted ? FJ_AMX_PERMITTED : 0;
  return b;
}

int fj_physical_cores(void) { return fiddler::GetCpuFeatures().physical_cores; }
int fj_logical_cpus(void) { return fiddler::GetCpuFeatures().logical_cpus; }

int fj_path_supported(int path) { return ValidPath(path) && fiddler::PathSupported(static_cast<Path>(path)); }

int fj_set_path(int path) {
  if (!ValidPath(path)) return -1;
  return fiddler::SetForcedPath(static_cast<Path>(path)) ? 0 : -1;
}

int fj_get_path(void) { return static_cast<int>(fiddler::GetForcedPath()); }
int fj_path_for_tokens(int64_t n) { return static_cast<int>(fiddler::PathForTokens(n)); }
void fj_set_amx_min_tokens(int64_t n) { fiddler::SetAmxMinTokens(n); }
void fj_set_quant_dense_min_tokens(int64_t n) { fiddler::SetQuantDenseMinTokens(n); }
int64_t fj_get_amx_min_tokens(void) { return fiddler::GetAmxMinTokens(); }
int fj_set_num_threads(int64_t n, int pin, char* err, int err_len) {
  return Report(fiddler::SetNumThreads(n, pin), err, err_len);
}
int fj_reset_num_threads(char* err, int err_len) { return Report(fiddler::ResetNumThreads(), err, err_len); }
int fj_max_threads(void) { return fiddler::MaxThreads(); }
int fj_get_num_threads(char* err, int err_len) {
  const char* msg = nullptr;
  const int n = fiddler::GetNumThreads(&msg);
  if (n < 0) Report(msg ? msg : "the kernel thread pool cannot start", err, err_len);
  return n;
}
int fj_set_pool(int64_t spin_us, int wait_all, int64_t streamed_spin_us, char* err, int err_len) {
  return Report(fiddler::SetPool(spin_us, wait_all, streamed_spin_us), err, err_len);
}
void fj_set_prefetch_bytes(int bytes) { fiddler::SetPrefetchBytes(bytes); }
void fj_set_amx_group_kib(int kib) { fiddler::SetAmxGroupKib(kib); }
void fj_set_amx_variant(int variant) { fiddler::SetAmxVariant(variant); }
void fj_set_amx_blocking(int kc, int mb, int pass, int prefetch, int blocked_from, int pipeline) {
  fiddler::SetAmxBlocking(kc, mb, pass, prefetch, blocked_from, pipeline);
}
int fj_read_probe(const uint64_t* p, const int64_t* bytes, int64_t n, uint64_t* sum, char* err, int err_len) {
  return Report(fiddler::ReadProbe(reinterpret_cast<const void* const*>(p), bytes, n, sum), err, err_len);
}

int fj_expert_ffn(const uint16_t* x, int64_t n, int64_t hidden, int64_t ffn, const uint16_t* w1,
                  const uint16_t* w3, const uint16_t* w2, void* y, int out_f32, char* err, int err_len) {
  return Report(fiddler::ExpertFfn(x, n, hidden, ffn, w1, w3, w2, y, out_f32 != 0), err, err_len);
}

int fj_grouped_expert_ffn(const uint16_t* x, int64_t T, int64_t hidden, int64_t ffn, int64_t E,
                          const int32_t* token_idx, const int32_t* expert_idx, const float* weights, int64_t A,
                          const uint16_t* w1, const uint16_t* w3, const uint16_t* w2, void* y, int out_f32,
                          char* err, int err_len) {
  return Report(fiddler::GroupedExpertFfn(x, T, hidden, ffn, E, token_idx, expert_idx, weights, A, w1, w3, w2, y,
                                          out_f32 != 0),
                err, err_len);
}

int fj_grouped_expert_ffn_tables(const uint16_t* x, int64_t T, int64_t hidden, int64_t ffn, int64_t E,
                                 const int32_t* token_idx, const int32_t* expert_idx, const float* weights,
                                 int64_t A, int format, int64_t group1, int64_t group2, const uint64_t* w1,
                                 const uint64_t* s1, const uint64_t* w3, const uint64_t* s3, const uint64_t* w2,
                                 const uint64_t* s2, void* y, int out_f32, char* err, int err_len) {
  auto table = [](const uint64_t* t) { return reinterpret_cast<const void* const*>(t); };
  static_assert(sizeof(uint64_t) == sizeof(const void*), "pointer tables are arrays of 64-bit addresses");
  return Report(fiddler::GroupedExpertFfnTables(x, T, hidden, ffn, E, token_idx, expert_idx, weights, A,
                                                static_cast<fiddler::WeightFormat>(format), group1, group2,
                                                table(w1), table(s1), table(w3), table(s3), table(w2), table(s2), y,
                                                out_f32 != 0),
                err, err_len);
}

}  // extern "C"
