// AVX512_BF16 phases for quantised experts (kernels.h: WeightFormat): the bfloat16 path's row streaming
// (row_kernel_phases.inc) over int8 or int4 weight rows. The integers q go into bf16 lanes exactly (int8 through
// a conversion, int4 as 128 + u by bit operations alone), vdpbf16ps dots them with the tokens' bf16 activations
// (exact products, float32 sums), and the scale multiplies the sum: once per row (int8) or once per 32-input step
// (int4). So the kernel computes with the exact weights q * scale, where the GPU's dequantised FFN rounds them to
// bf16 first: the two lanes agree to bf16 rounding, as for bf16 experts. Decode is memory-bound, so reading 2x
// (int8) or ~4x (int4) fewer bytes per weight is the point; unpacking costs a few instructions per step and row,
// shared by the step's tokens.
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

// Two 16-byte halves of int8 weights -> 32 bf16 holding the same integers (exact: |q| <= 127 < 2^8).
inline __m512bh Int8Bf16(__m128i lo, __m128i hi) {
  return _mm512_cvtne2ps_pbh(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)),
                             _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)));
}

// An int8 row for avx512_dot.inc: the integers dotted exactly (bf16 q times bf16 x is exact in float32), the
// row's scale applied once to the sum.
inline __m512bh AsBf16(__m512i v) { return (__m512bh)v; }
inline __m512bh RowWeights(const Int8Row& w, int64_t c) {
  return Int8Bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.q + c)),
                  _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.q + c + 16)));
}
inline __m512bh RowWeightsMasked(const Int8Row& w, int64_t c, __mmask32 m) {
  const __m256i b = _mm256_maskz_loadu_epi8(m, w.q + c);
  return Int8Bf16(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
}
inline const int8_t* RowAt(const Int8Row& w, int64_t i) { return w.q + i; }
inline float RowSum(const Int8Row& w, float sum) { return w.scale * sum; }

#include "avx512_dot.inc"

// The even elements of a step to lanes 0..15 and the odd ones to 16..31, as Int4Step lays out the weights.
inline __m512i EvenOddIndex() {
  alignas(64) uint16_t idx[32];
  for (int j = 0; j < 16; ++j) idx[j] = static_cast<uint16_t>(2 * j), idx[16 + j] = static_cast<uint16_t>(2 * j + 1);
  return _mm512_load_si512(idx);
}

// 16 bytes of packed nibbles -> 32 bf16 values 128 + u, u = q + 8 in [0, 15] (the two's-complement nibble with
// its top bit flipped): lanes 0..15 from the low nibbles (even elements), 16..31 from the high (odd). Each byte is
// widened to a 16-bit lane, shifted for the high half, and one ternary-logic op keeps the nibble, flips bit 3
// and sets the bf16 pattern of 128 (0x4300; 128 + u is exact in bf16): no conversion instructions.
inline __m512bh Int4Step(__m128i b) {
  const __m256i words = _mm256_cvtepu8_epi16(b);
  const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(words), _mm256_srli_epi16(words, 4), 1);
  // (both & 0x000F) ^ 0x4308
  return (__m512bh)_mm512_ternarylogic_epi32(both, _mm512_set1_epi16(0x000F), _mm512_set1_epi16(0x4308), 0x6A);
}

// out[r * TB + t] = sum over groups g of scale[r, g] * sum_{c in g} q[r, c] x[t, c] for int4 rows. Each 32-input
// step lies inside one group (groups are multiples of 32 inputs, or the whole row); per step and token the sum
// sum (128 + u_c) x_c comes from one vdpbf16ps started at -136 (x_c pairs) -- computed once per token and step
// for all rows -- so it is sum (u_c - 8) x_c = sum q_c x_c, and that times the group's scale goes into the
// accumulator (one FMA). Exact products; float32 sums.
// Every 16-bit lane of v (a byte widened) -> bf16 128 + u of its low nibble, u = nibble ^ 8 (Int4Step's pattern).
inline __m512bh NibblesAsBf16(__m512i v) {
  return (__m512bh)_mm512_ternarylogic_epi32(v, _mm512_set1_epi16(0x000F), _mm512_set1_epi16(0x4308), 0x6A);
}

// The 2-source word permutes that split 64 activations into even (lanes j <- 2j) and odd (j <- 2j + 1) elements.
inline __m512i SplitIndex(int odd) {
  alignas(64) uint16_t idx[32];
  for (int j = 0; j < 32; ++j) idx[j] = static_cast<uint16_t>(2 * j + odd);
  return _mm512_load_si512(idx);
}

// The scales of a 64-input block as the accumulator's lanes see them: after the two vdpbf16ps of a block, f32
// lane i holds elements 4i..4i+3, so lanes 0-7 are the block's first 32 inputs and 8-15 its last 32. One group
// over the block: its scale everywhere; groups of 32: the two groups' scales, 8 lanes each.
inline __m512 BlockScales(const uint16_t* scales, int64_t c, int64_t group) {
  if (group != 32) return _mm512_set1_ps(_cvtsh_ss(scales[c / group]));
  const __m512 lo = _mm512_set1_ps(_cvtsh_ss(scales[c / 32])), hi = _mm512_set1_ps(_cvtsh_ss(scales[c / 32 + 1]));
  return _mm512_mask_blend_ps(0xFF00, lo, hi);
}

template <int R, int TB>
inline void Dot(const Int4Row* w, const uint16_t* x, int64_t ldx, int64_t k, int64_t pf, float* out) {
  const __m512i perm = EvenOddIndex();
  const __m512bh minus136 = (__m512bh)_mm512_set1_epi16(static_cast<int16_t>(0xC308));  // bf16 -136
  const int64_t group = w[0].group;
  __m512 acc[R][TB], s[R];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
  // 64-input blocks while a block lies inside one group or covers two groups of 32: 32 bytes of a row widen to
  // 32 words, whose low nibbles are the even elements and high nibbles the odd ones, dotted with the even and odd
  // activations (two 2-source permutes per token, shared by the rows); 8 instructions per row and block against 14
  // for two 32-input steps. The rest of the row (and rows whose one group is shorter) goes 32 at a time below.
  const bool blocks = group == 32 || group % 64 == 0 || group == k;
  const int64_t k64 = blocks ? k / 64 * 64 : 0;
  int64_t c = 0;
  if (k64) {
    const __m512i even = SplitIndex(0), odd = SplitIndex(1);
    for (; c < k64; c += 64) {
      if (pf) {
        for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w[r].q + (c + pf) / 2), _MM_HINT_T1);
      }
      __m512bh xe[TB], xo[TB];
      __m512 base[TB];
      for (int t = 0; t < TB; ++t) {
        const __m512i a = _mm512_loadu_si512(x + t * ldx + c), b = _mm512_loadu_si512(x + t * ldx + c + 32);
        xe[t] = (__m512bh)_mm512_permutex2var_epi16(a, even, b);
        xo[t] = (__m512bh)_mm512_permutex2var_epi16(a, odd, b);
        base[t] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), minus136, xe[t]), minus136, xo[t]);
      }
      for (int r = 0; r < R; ++r) {
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r].q + c / 2)));
        const __m512bh lo = NibblesAsBf16(v), hi = NibblesAsBf16(_mm512_srli_epi16(v, 4));
        const __m512 sc = BlockScales(w[r].scales, c, group);
        for (int t = 0; t < TB; ++t)
          acc[r][t] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_dpbf16_ps(base[t], lo, xe[t]), hi, xo[t]), sc,
                                      acc[r][t]);
      }
    }
  }
  int64_t g = c / group - 1, group_end = (g + 1) * group;
  for (; c < k; c += 32) {
    if (c >= group_end) {  // a new group: its scales
      ++g;
      group_end += group;
      for (int r = 0; r < R; ++r) s[r] = _mm512_set1_ps(_cvtsh_ss(w[r].scales[g]));  // F16C: one instruction
    }
    const bool full = c + 32 <= k;
    const __mmask32 m = full ? ~__mmask32{0} : static_cast<__mmask32>((1ull << (k - c)) - 1);
    const __mmask16 mb = full ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << ((k - c) / 2)) - 1);
    if (pf && full) {
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w[r].q + (c + pf) / 2), _MM_HINT_T1);
    }
    __m512bh xv[TB];
    __m512 base[TB];  // -136 x summed in each lane's pair: the offset's share of this step
    for (int t = 0; t < TB; ++t) {
      xv[t] = (__m512bh)_mm512_permutexvar_epi16(perm, _mm512_maskz_loadu_epi16(m, x + t * ldx + c));
      base[t] = _mm512_dpbf16_ps(_mm512_setzero_ps(), minus136, xv[t]);
    }
    for (int r = 0; r < R; ++r) {
      // masked-off bytes read as 0, i.e. u = 8: their x is 0, so they add nothing
      const __m512bh wv = Int4Step(_mm_maskz_loadu_epi8(mb, w[r].q + c / 2));
      for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_fmadd_ps(_mm512_dpbf16_ps(base[t], wv, xv[t]), s[r], acc[r][t]);
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

void DequantRowsBf16(const QuantMatrix& m, int64_t k, int64_t r0, int64_t r1, uint16_t* out) {
  alignas(64) uint16_t idx[32];  // interleave: lane 2j <- j (low nibbles), lane 2j + 1 <- 16 + j (high)
  for (int j = 0; j < 16; ++j) idx[2 * j] = static_cast<uint16_t>(j), idx[2 * j + 1] = static_cast<uint16_t>(16 + j);
  const __m512i interleave = _mm512_load_si512(idx);
  for (int64_t r = r0; r < r1; ++r) {
    uint16_t* dst = out + (r - r0) * k;
    for (int64_t c = 0; c < k; c += 32) {
      const bool full = c + 32 <= k;
      const __mmask32 m32 = full ? ~__mmask32{0} : static_cast<__mmask32>((1ull << (k - c)) - 1);
      __m512i v;
      if (m.format == WeightFormat::kInt8) {
        const int8_t* q = static_cast<const int8_t*>(m.data) + r * k + c;
        const __m512 s = _mm512_set1_ps(static_cast<const float*>(m.scales)[r]);
        const __m256i b = _mm256_maskz_loadu_epi8(m32, q);
        const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b))), s);
        const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1))), s);
        v = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
      } else {
        const uint8_t* q = static_cast<const uint8_t*>(m.data) + r * (k / 2) + c / 2;
        const uint16_t* sc = static_cast<const uint16_t*>(m.scales) + r * (k / m.group);
        const __m512 s = _mm512_set1_ps(_cvtsh_ss(sc[c / m.group]));
        const __mmask16 m16 = full ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << ((k - c) / 2)) - 1);
        const __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m16, q));
        const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 28), 28)), s);
        const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(b, 24), 28)), s);
        v = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
      _mm512_mask_storeu_epi16(dst + c, m32, v);
    }
  }
}

}  // namespace avx512
}  // namespace fiddler
