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

// out[r * TB + t] = <w[r], x[t]> over k. The operation order per output is the same for every R and TB.
template <int R, int TB>
inline void Dot(const uint16_t* const* w, const float* x, int64_t ldx, int64_t k, float* out) {
  __m256 acc[R][TB];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm256_setzero_ps();
  const int64_t pf = g_prefetch_bytes / 2;
  int64_t c = 0;
  for (; c + 32 <= k; c += 32) {
    if (pf) {
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w[r] + c + pf), _MM_HINT_T0);
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

template <int R>
inline void DotTokens(const uint16_t* const* w, const float* x, int64_t ldx, int64_t k, int64_t t,
                      int64_t n, float* out) {
  if (t + 2 <= n) {
    Dot<R, 2>(w, x + t * ldx, ldx, k, out);
  } else {
    Dot<R, 1>(w, x + t * ldx, ldx, k, out);
  }
}

void DotRows(int rows, const uint16_t* const* w, const float* x, int64_t ldx, int64_t k, int64_t t,
             int64_t n, float* out) {
  switch (rows) {
    case 4: DotTokens<4>(w, x, ldx, k, t, n, out); break;
    case 3: DotTokens<3>(w, x, ldx, k, t, n, out); break;
    case 2: DotTokens<2>(w, x, ldx, k, t, n, out); break;
    default: DotTokens<1>(w, x, ldx, k, t, n, out); break;
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

void Phase1(const void* x_act, int64_t n, int64_t hidden, const uint16_t* w1, const uint16_t* w3,
            int64_t F, int64_t r0, int64_t r1, void* h_act) {
  const float* x = static_cast<const float*>(x_act);
  float* h = static_cast<float*>(h_act);
  constexpr int kPairs = kRows / 2;
  for (int64_t j = r0; j < r1; j += kPairs) {
    const int pairs = static_cast<int>(r1 - j < kPairs ? r1 - j : kPairs);
    const uint16_t* w[kRows];
    for (int p = 0; p < pairs; ++p) {
      w[p] = w1 + (j + p) * hidden;
      w[pairs + p] = w3 + (j + p) * hidden;
    }
    for (int64_t t = 0; t < n; t += kTokens) {
      const int tb = static_cast<int>(n - t < kTokens ? n - t : kTokens);
      float out[kRows * kTokens];
      DotRows(2 * pairs, w, x, hidden, hidden, t, n, out);
      for (int p = 0; p < pairs; ++p)
        for (int q = 0; q < tb; ++q) h[(t + q) * F + j + p] = Silu(out[p * tb + q]) * out[(pairs + p) * tb + q];
    }
  }
}

void Phase2(const void* h_act, int64_t n, int64_t F, const uint16_t* w2, int64_t /*hidden*/, int64_t r0,
            int64_t r1, OutView o) {
  const float* h = static_cast<const float*>(h_act);
  for (int64_t i = r0; i < r1; i += kRows) {
    const int rows = static_cast<int>(r1 - i < kRows ? r1 - i : kRows);
    const uint16_t* w[kRows];
    for (int r = 0; r < rows; ++r) w[r] = w2 + (i + r) * F;
    for (int64_t t = 0; t < n; t += kTokens) {
      const int tb = static_cast<int>(n - t < kTokens ? n - t : kTokens);
      float out[kRows * kTokens];
      DotRows(rows, w, h, F, F, t, n, out);
      for (int r = 0; r < rows; ++r) {
        for (int q = 0; q < tb; ++q) {
          if (o.f32) {
            static_cast<float*>(o.data)[(t + q) * o.ld + i + r] = out[r * tb + q];
          } else {
            static_cast<uint16_t*>(o.data)[(t + q) * o.ld + i + r] = F32ToBf16(out[r * tb + q]);
          }
        }
      }
    }
  }
}

}  // namespace

const PathKernels kKernels = {"avx2", false, kRows, ActBytes, Pack, Phase1, Phase2};

}  // namespace avx2
}  // namespace fiddler
