// Scalar stand-ins for the few AVX-512 and AMX intrinsics the kernels use, so kernel_avx512.cc and
// kernel_amx.cc can be compiled with -DFIDDLER_ISA_EMULATION and checked on CPUs without those units
// (tests/test_kernel_emulation.py). Semantics follow the Intel pseudo-code; speed is irrelevant.
#pragma once

#include <xmmintrin.h>  // _mm_prefetch (SSE, baseline x86-64)

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

struct __m512 { float f[16]; };
struct __m512i { uint16_t h[32]; };
struct __m512bh { uint16_t h[32]; };
typedef uint32_t __mmask32;

static inline float EmuBf16(uint16_t v) {
  uint32_t b = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

static inline __m512bh EmuAsBf16(__m512i v) {
  __m512bh r;
  std::memcpy(r.h, v.h, 64);
  return r;
}

static inline __m512 _mm512_setzero_ps() { return __m512{}; }

static inline __m512i _mm512_loadu_si512(const void* p) {
  __m512i r;
  std::memcpy(r.h, p, 64);
  return r;
}

static inline __m512i _mm512_maskz_loadu_epi16(__mmask32 m, const void* p) {
  __m512i r;
  const uint16_t* s = static_cast<const uint16_t*>(p);
  for (int i = 0; i < 32; ++i) r.h[i] = ((m >> i) & 1) ? s[i] : 0;  // masked-off lanes are not read
  return r;
}

static inline __m512 _mm512_dpbf16_ps(__m512 src, __m512bh a, __m512bh b) {
  for (int i = 0; i < 16; ++i) {
    src.f[i] += EmuBf16(a.h[2 * i + 1]) * EmuBf16(b.h[2 * i + 1]);
    src.f[i] += EmuBf16(a.h[2 * i]) * EmuBf16(b.h[2 * i]);
  }
  return src;
}

static inline float _mm512_reduce_add_ps(__m512 v) {
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) v.f[i] += v.f[i + w];
  return v.f[0];
}

// ---- AMX: 8 tiles of up to 16 rows x 64 bytes, configured by a 64-byte palette-1 config.
struct EmuTileState {
  bool configured = false;
  int rows[8] = {};
  int colsb[8] = {};
  unsigned char data[8][16][64] = {};
};
static EmuTileState& EmuTiles() {
  static thread_local EmuTileState s;
  return s;
}

static inline void EmuFail(const char* what) {
  std::fprintf(stderr, "AMX emulation: %s\n", what);
  std::abort();
}

template <typename Cfg>
static inline void EmuTileLoadConfig(const Cfg* cfg) {
  const unsigned char* c = reinterpret_cast<const unsigned char*>(cfg);
  if (c[0] != 1) EmuFail("palette must be 1");
  EmuTileState& s = EmuTiles();
  for (int t = 0; t < 8; ++t) {
    uint16_t cb;
    std::memcpy(&cb, c + 16 + 2 * t, 2);
    s.colsb[t] = cb;
    s.rows[t] = c[48 + t];
    if (s.rows[t] > 16 || s.colsb[t] > 64) EmuFail("tile shape too large");
  }
  s.configured = true;
}

static inline void EmuTileRelease() { EmuTiles().configured = false; }

static inline void EmuCheck(int t) {
  if (!EmuTiles().configured) EmuFail("tile used before ldtilecfg");
  if (t < 0 || t > 7) EmuFail("bad tile number");
}

static inline void EmuTileZero(int t) {
  EmuCheck(t);
  std::memset(EmuTiles().data[t], 0, sizeof(EmuTiles().data[t]));
}

static inline void EmuTileLoad(int t, const void* base, long stride) {
  EmuCheck(t);
  EmuTileState& s = EmuTiles();
  for (int r = 0; r < s.rows[t]; ++r)
    std::memcpy(s.data[t][r], static_cast<const unsigned char*>(base) + r * stride, s.colsb[t]);
}

static inline void EmuTileStore(int t, void* base, long stride) {
  EmuCheck(t);
  EmuTileState& s = EmuTiles();
  for (int r = 0; r < s.rows[t]; ++r)
    std::memcpy(static_cast<unsigned char*>(base) + r * stride, s.data[t][r], s.colsb[t]);
}

// C[m][n] += sum_k A.bf16[m][2k] * B.bf16[k][2n] + A.bf16[m][2k+1] * B.bf16[k][2n+1]
static inline void EmuTileDpbf16ps(int c, int a, int b) {
  EmuCheck(c);
  EmuCheck(a);
  EmuCheck(b);
  EmuTileState& s = EmuTiles();
  const int M = s.rows[a], K = s.colsb[a] / 4, N = s.colsb[c] / 4;
  if (s.rows[c] != M || s.rows[b] != K || s.colsb[b] != s.colsb[c]) EmuFail("tile shapes do not match");
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      float acc;
      std::memcpy(&acc, &s.data[c][m][4 * n], 4);
      for (int k = 0; k < K; ++k) {
        uint16_t a0, a1, b0, b1;
        std::memcpy(&a0, &s.data[a][m][4 * k], 2);
        std::memcpy(&a1, &s.data[a][m][4 * k + 2], 2);
        std::memcpy(&b0, &s.data[b][k][4 * n], 2);
        std::memcpy(&b1, &s.data[b][k][4 * n + 2], 2);
        acc += EmuBf16(a0) * EmuBf16(b0) + EmuBf16(a1) * EmuBf16(b1);
      }
      std::memcpy(&s.data[c][m][4 * n], &acc, 4);
    }
  }
}
