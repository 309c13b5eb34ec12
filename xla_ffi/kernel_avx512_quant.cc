// AVX512_BF16 phases for quantised experts (kernels.h: WeightFormat): the bfloat16 path's row streaming
// (row_kernel_phases.inc) over int8 or int4 weight rows, dequantised in registers. Each 32-weight step loads
// 32 (int8) or 16 (int4) bytes of a row, widens them to 32-bit integers, converts to float32, multiplies by the
// row's (int8) or group's (int4) scale and rounds to bfloat16 (vcvtne2ps2bf16, nearest even): exactly the
// weights W' the GPU's dequantised FFN uses. Then vdpbf16ps with the tokens' bf16 activations, as for bf16
// weights. Decode is memory-bound, so reading 2x (int8) or ~4x (int4) fewer bytes per weight is the point; the
// dequantisation costs a few instructions per step per row, shared by the step's tokens.
//
// int4 nibbles come out de-interleaved (lanes 0..15: elements 0, 2, .., 30; lanes 16..31: 1, 3, .., 31), so the
// activations of each step are permuted the same way once (vpermw), not every row's weights.
#include <cstddef>
#include <cstdint>

#include "kernels.h"

#include <immintrin.h>
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
// GCC 12's own intrinsic wrappers (avx512fintrin.h) warn about their undefined pass-through operands.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "bf16_math.h"

namespace fiddler {
namespace avx512 {
namespace {

constexpr int kRows = 8;    // as the bfloat16 path
constexpr int kTokens = 2;

using Act = uint16_t;
inline Act StoreH(float v) { return F32ToBf16(v); }

// One int8 row: its bytes and its scale.
struct Int8Row {
  const int8_t* q;
  float scale;
};

// One int4 row: its packed bytes, its float16 scales (one per group) and the group.
struct Int4Row {
  const uint8_t* q;
  const uint16_t* scales;
  int64_t group;
};

struct Int8Rows {
  using Row = Int8Row;
  const int8_t* q;
  const float* scales;
  int64_t k;
  Row row(int64_t j) const { return {q + j * k, scales[j]}; }
};

struct Int4Rows {
  using Row = Int4Row;
  const uint8_t* q;
  const uint16_t* scales;
  int64_t k, group;
  Row row(int64_t j) const { return {q + j * (k / 2), scales + j * (k / group), group}; }
};

// 16 int32 lanes -> float32 -> times s; the two halves of a step -> 32 bf16 (lo in lanes 0..15).
inline __m512bh ScaleToBf16(__m512i lo, __m512i hi, __m512 s) {
  return _mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), s), _mm512_mul_ps(_mm512_cvtepi32_ps(lo), s));
}

inline __m512bh Int8Step(__m256i b, __m512 s) {
  return ScaleToBf16(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)),
                     _mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)), s);
}

// 16 bytes of packed nibbles -> lanes 0..15 the low (even) elements, 16..31 the high (odd), sign-extended.
inline __m512bh Int4Step(__m128i b, __m512 s) {
  const __m512i v = _mm512_cvtepu8_epi32(b);
  const __m512i lo = _mm512_srai_epi32(_mm512_slli_epi32(v, 28), 28);
  const __m512i hi = _mm512_srai_epi32(_mm512_slli_epi32(v, 24), 28);
  return ScaleToBf16(lo, hi, s);
}

// out[r * TB + t] = <W'[r], x[t]> for int8 rows (fixed operation order; a masked last step).
template <int R, int TB>
inline void Dot(const Int8Row* w, const uint16_t* x, int64_t ldx, int64_t k, int64_t pf, float* out) {
  __m512 acc[R][TB], s[R];
  for (int r = 0; r < R; ++r) {
    s[r] = _mm512_set1_ps(w[r].scale);
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  int64_t c = 0;
  for (; c + 32 <= k; c += 32) {
    if (pf) {
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w[r].q + c + pf), _MM_HINT_T1);
    }
    __m512bh xv[TB];
    for (int t = 0; t < TB; ++t) xv[t] = (__m512bh)_mm512_loadu_si512(x + t * ldx + c);
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = Int8Step(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r].q + c)), s[r]);
      for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);
    }
  }
  if (c < k) {
    const __mmask32 m = static_cast<__mmask32>((1ull << (k - c)) - 1);
    __m512bh xv[TB];
    for (int t = 0; t < TB; ++t) xv[t] = (__m512bh)_mm512_maskz_loadu_epi16(m, x + t * ldx + c);
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = Int8Step(_mm256_maskz_loadu_epi8(m, w[r].q + c), s[r]);
      for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TB; ++t) out[r * TB + t] = _mm512_reduce_add_ps(acc[r][t]);
}

// The even elements of a step to lanes 0..15 and the odd ones to 16..31, as Int4Step lays out the weights.
inline __m512i EvenOddIndex() {
  alignas(64) uint16_t idx[32];
  for (int j = 0; j < 16; ++j) idx[j] = static_cast<uint16_t>(2 * j), idx[16 + j] = static_cast<uint16_t>(2 * j + 1);
  return _mm512_load_si512(idx);
}

// out[r * TB + t] = <W'[r], x[t]> for int4 rows. A step lies inside one group (groups are multiples of 32
// inputs, or the whole row), so each row's scale changes only at a group boundary.
template <int R, int TB>
inline void Dot(const Int4Row* w, const uint16_t* x, int64_t ldx, int64_t k, int64_t pf, float* out) {
  const __m512i perm = EvenOddIndex();
  const int64_t group = w[0].group;
  __m512 acc[R][TB], s[R];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t c = 0, g = -1, group_end = 0;
  for (; c < k; c += 32) {
    if (c >= group_end) {  // a new group: its scales
      ++g;
      group_end += group;
      for (int r = 0; r < R; ++r) s[r] = _mm512_set1_ps(F16ToF32(w[r].scales[g]));
    }
    const bool full = c + 32 <= k;
    const __mmask32 m = full ? ~__mmask32{0} : static_cast<__mmask32>((1ull << (k - c)) - 1);
    const __mmask16 mb = full ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << ((k - c) / 2)) - 1);
    if (pf && full) {
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w[r].q + (c + pf) / 2), _MM_HINT_T1);
    }
    __m512bh xv[TB];
    for (int t = 0; t < TB; ++t)
      xv[t] = (__m512bh)_mm512_permutexvar_epi16(perm, _mm512_maskz_loadu_epi16(m, x + t * ldx + c));
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = Int4Step(_mm_maskz_loadu_epi8(mb, w[r].q + c / 2), s[r]);
      for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TB; ++t) out[r * TB + t] = _mm512_reduce_add_ps(acc[r][t]);
}

#define FIDDLER_ROW_PHASES_QUANT_ONLY
#include "row_kernel_phases.inc"

void Phase1Q(const void* x_act, int64_t n, int64_t hidden, const QuantMatrix& w1, const QuantMatrix& w3,
             int64_t F, int64_t r0, int64_t r1, void* h_act) {
  if (w1.format == WeightFormat::kInt8) {
    Phase1Of(x_act, n, hidden,
             Int8Rows{static_cast<const int8_t*>(w1.data), static_cast<const float*>(w1.scales), hidden},
             Int8Rows{static_cast<const int8_t*>(w3.data), static_cast<const float*>(w3.scales), hidden}, F, r0,
             r1, h_act);
  } else {
    Phase1Of(x_act, n, hidden,
             Int4Rows{static_cast<const uint8_t*>(w1.data), static_cast<const uint16_t*>(w1.scales), hidden,
                      w1.group},
             Int4Rows{static_cast<const uint8_t*>(w3.data), static_cast<const uint16_t*>(w3.scales), hidden,
                      w3.group},
             F, r0, r1, h_act);
  }
}

void Phase2Q(const void* h_act, int64_t n, int64_t F, const QuantMatrix& w2, int64_t /*hidden*/, int64_t r0,
             int64_t r1, OutView out) {
  if (w2.format == WeightFormat::kInt8) {
    Phase2Of(h_act, n, F, Int8Rows{static_cast<const int8_t*>(w2.data), static_cast<const float*>(w2.scales), F},
             r0, r1, out);
  } else {
    Phase2Of(h_act, n, F,
             Int4Rows{static_cast<const uint8_t*>(w2.data), static_cast<const uint16_t*>(w2.scales), F, w2.group},
             r0, r1, out);
  }
}

}  // namespace

const QuantKernels kQuantKernels = {Phase1Q, Phase2Q};

}  // namespace avx512
}  // namespace fiddler
