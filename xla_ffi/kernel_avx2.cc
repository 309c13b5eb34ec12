// AVX2 + FMA path (the portable fast fallback): bf16 weights widened to fp32 in registers, fp32 activations.
// Compiled with a target pragma so the rest of the library stays baseline x86-64.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kernels.h"

#pragma GCC target("avx2,fma,f16c")

#include "bf16_math.h"

namespace fiddler {
namespace avx2 {
namespace {

constexpr int kRows = 4;    // weight rows per micro-kernel (phase 1: 2 of w1 + 2 of w3)
constexpr int kTokens = 2;  // tokens per micro-kernel

inline __m256 LoadBf16x8(const uint16_t* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// out[r * TB + t] = <w[r], x[t]> over k (pf > 0: each 32-element step also prefetches w[r] + c + pf into L2).
// The operation order per output is the same for every R and TB.
template <int R, int TB>
inline void Dot(const uint16_t* const* w, const float* x, int64_t ldx, int64_t k, int64_t pf, float* out) {
  __m256 acc[R][TB];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= k; c += 32) {
    if (pf) {
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w[r] + c + pf), _MM_HINT_T1);
    }
    for (int s = 0; s < 32; s += 8) {
      __m256 xv[TB];
      for (int t = 0; t < TB; ++t) xv[t] = _mm256_loadu_ps(x + t * ldx + c + s);
      for (int r = 0; r < R; ++r) {
        __m256 wv = LoadBf16x8(w[r] + c + s);
        for (int t = 0; t < TB; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
      }
    }
  }
  for (; c + 8 <= k; c += 8) {
    __m256 xv[TB];
    for (int t = 0; t < TB; ++t) xv[t] = _mm256_loadu_ps(x + t * ldx + c);
    for (int r = 0; r < R; ++r) {
      __m256 wv = LoadBf16x8(w[r] + c);
      for (int t = 0; t < TB; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < TB; ++t) {
      float s = HorizontalSum(acc[r][t]);
      for (int64_t cc = c; cc < k; ++cc) s += Bf16ToF32(w[r][cc]) * x[t * ldx + cc];
      out[r * TB + t] = s;
    }
  }
}

size_t ActBytes(int64_t n, int64_t k) { return static_cast<size_t>(n * k) * sizeof(float); }

void Pack(const uint16_t* x, int64_t k, const int32_t* idx, int64_t /*n*/, int64_t t0, int64_t t1,
          void* act) {
  float* dst = static_cast<float*>(act);
  for (int64_t t = t0; t < t1; ++t) {
    const uint16_t* src = x + (idx ? idx[t] : t) * k;
    float* d = dst + t * k;
    int64_t c = 0;
    for (; c + 8 <= k; c += 8) _mm256_storeu_ps(d + c, LoadBf16x8(src + c));
    for (; c < k; ++c) d[c] = Bf16ToF32(src[c]);
  }
}

using Act = float;
inline Act StoreH(float v) { return v; }

#include "row_kernel_phases.inc"

}  // namespace

const PathKernels kKernels = {"avx2", false, kRows, ActBytes, Pack, Phase1, Phase2};

}  // namespace avx2
}  // namespace fiddler
