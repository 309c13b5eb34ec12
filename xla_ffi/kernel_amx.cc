// AMX-BF16 path: the prefill / many-token path. Weight rows are the A operand (16 rows x 32 k per tile),
// loaded straight from the HF row-major layout with the row stride -- no repacking of weights. Activations
// are the B operand and are packed once per call into VNNI tiles:
//   act[tile t/16][k-block c/32][pair (c%32)/2][token t%16][c%2]   (1 KiB per 16 tokens x 32 k)
// Phase 1 writes h straight into that layout so phase 2 reads it as B. C tiles hold [16 rows x 16 tokens].
// Tile registers: C 0-3, A 4-5, B 6-7. Rows or k beyond the matrix are fed from a zero-padded 1 KiB copy.
// Variants (g_amx_variant; auto: direct below g_amx_blocked_from token tiles, blocked from there): direct (A
// tiles loaded in place from the weight rows, C in registers over all of K), blocked (BlockedGemm: packed A
// panels, L2-resident activation chunks, C spilled as fp32 between k-chunks) and k-chunked (blocked with one
// tile pair per m-block). All give the same bits.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

#if defined(FIDDLER_ISA_EMULATION)
#include "emulation/isa_emulation.h"
#else
#include <immintrin.h>
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#endif

#include "bf16_math.h"

namespace fiddler {

int g_amx_group_kib = 1 << 20;  // v1: budget for the activation tiles re-read per weight row block
int g_amx_variant = 0;          // 0 auto (blocked from g_amx_blocked_from token tiles, else direct), 1 direct,
                                // 2 k-chunked (v2), 3 blocked (v3)
int g_amx_blocked_from = 3;     // auto: blocked (v3) from this many token tiles
int g_amx_kc = 0;               // v3: k-blocks (32 k each) per chunk; 0: auto (activation chunk ~1 MiB, 8..64)
int g_amx_mb = 128;             // v3: weight rows per m-block (per matrix in phase 1; w2 rows in phase 2)
int g_amx_pass = 32;            // v3: token tiles (16 tokens each) per pass
int g_amx_prefetch = 1;         // v3: prefetch the next A panel into L2 while the current one is used
int g_amx_pipeline = 1;         // v3: software-pipelined 2x2 micro-kernel (Kernel2x2); 0: plain loop

namespace amx {
namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

#if defined(FIDDLER_ISA_EMULATION)
#define TILE_LOADCONFIG(cfg) EmuTileLoadConfig(cfg)
#define TILE_RELEASE() EmuTileRelease()
#define TILE_ZERO(t) EmuTileZero(t)
#define TILE_LOADD(t, base, stride) EmuTileLoad(t, base, stride)
#define TILE_STORED(t, base, stride) EmuTileStore(t, base, stride)
#define TILE_DPBF16PS(c, a, b) EmuTileDpbf16ps(c, a, b)
#else
#define TILE_LOADCONFIG(cfg) __asm__ volatile("ldtilecfg %0" ::"m"(*(cfg)) : "memory")
#define TILE_RELEASE() __asm__ volatile("tilerelease" ::: "memory")
#define TILE_ZERO(t) __asm__ volatile("tilezero %%tmm" #t ::)
#define TILE_LOADD(t, base, stride) \
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(base), "r"(static_cast<long>(stride)) : "memory")
#define TILE_STORED(t, base, stride) \
  __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"(base), "r"(static_cast<long>(stride)) : "memory")
#define TILE_DPBF16PS(c, a, b) __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)
#endif

inline int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t NumTiles(int64_t n) { return (n + 15) / 16; }
inline int64_t NumKBlocks(int64_t k) { return (k + 31) / 32; }
inline int64_t ActIndex(int64_t t, int64_t c, int64_t kb) {
  return (((t >> 4) * kb + (c >> 5)) * 16 + ((c & 31) >> 1)) * 32 + (t & 15) * 2 + (c & 1);
}

void ConfigureTiles() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  TILE_LOADCONFIG(&cfg);
}

// Source of the A tile for weight rows [r, r+16) and k-block kb of a row-major [R, K] matrix: the matrix
// itself when the block lies inside it, else a zero-padded copy in buf (16 x 32 bf16).
inline const uint16_t* ATile(const uint16_t* w, int64_t R, int64_t K, int64_t r, int64_t kb, uint16_t* buf,
                             int64_t* stride) {
  const int64_t c0 = kb * 32;
  if (r + 16 <= R && c0 + 32 <= K) {
    *stride = K * 2;
    return w + r * K + c0;
  }
  const int64_t rows = Min(16, R - r), cols = Min(32, K - c0);
  for (int64_t i = 0; i < 16; ++i) {
    for (int64_t c = 0; c < 32; ++c) buf[i * 32 + c] = (i < rows && c < cols) ? w[(r + i) * K + c0 + c] : 0;
  }
  *stride = 64;
  return buf;
}

// h[t, r + i] for the 16 tokens of tile tt and rows i < rows: silu(g) * u, rounded to bf16, written into the
// VNNI layout; row pairs (j even, j + 1) form 16 contiguous uint32, stored as one 64-byte vector.
#if defined(FIDDLER_ISA_EMULATION)
inline void SiluStore(const float* g, const float* u, int64_t rows, int64_t r, int64_t tt, int64_t kb_h,
                      uint16_t* h) {
  for (int64_t i = 0; i < rows; ++i)
    for (int q = 0; q < 16; ++q) h[ActIndex(tt * 16 + q, r + i, kb_h)] = F32ToBf16(Silu(g[i * 16 + q]) * u[i * 16 + q]);
}
#else
inline __m512 ExpV(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
  const __m512 nf = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(nf, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(nf, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, nf);
}

// silu(g) * u for 16 lanes, rounded to bf16 (nearest even; NaN stays a quiet NaN) in the low 16 bits.
inline __m512i SiluBf16(const float* g, const float* u) {
  const __m512 gv = _mm512_loadu_ps(g);
  const __m512 e = ExpV(_mm512_sub_ps(_mm512_setzero_ps(), gv));
  const __m512 v = _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), _mm512_loadu_ps(u));
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i rne = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i qnan = _mm512_or_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40));
  return _mm512_mask_mov_epi32(rne, nan, qnan);
}

inline void SiluStore(const float* g, const float* u, int64_t rows, int64_t r, int64_t tt, int64_t kb_h,
                      uint16_t* h) {
  int64_t i = 0;
  for (; i < rows; ++i) {
    const int64_t j = r + i;
    if ((j & 1) == 0 && i + 1 < rows) {
      const __m512i lo = SiluBf16(g + i * 16, u + i * 16);
      const __m512i hi = SiluBf16(g + (i + 1) * 16, u + (i + 1) * 16);
      _mm512_storeu_si512(h + ActIndex(tt * 16, j, kb_h), _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      ++i;
    } else {
      alignas(64) uint32_t v[16];
      _mm512_store_si512(v, SiluBf16(g + i * 16, u + i * 16));
      for (int q = 0; q < 16; ++q) h[ActIndex(tt * 16 + q, j, kb_h)] = static_cast<uint16_t>(v[q]);
    }
  }
}
#endif

// Token tiles processed per pass over a weight row block: as many as fit the group budget (at least 2).
inline int64_t GroupTiles(int64_t kblocks) {
  int64_t g = (static_cast<int64_t>(g_amx_group_kib) * 1024) / (kblocks * 1024);
  return g < 2 ? 2 : g;
}

// ---- Blocked (v3) and k-chunked (v2) variants: one routine, BlockedGemm. For one m-block of weight-row
// tile pairs and one pass of token tiles, per chunk of kc k-blocks, each pair's A panel (2 slots x 16 rows x
// 32 k per block) is copied into a contiguous per-thread buffer -- weight rows sit at a 4 KiB-multiple stride,
// which maps all 16 rows of a tile to one L1 set -- and reused from L1 for every token tile of the pass, while
// the chunk of the activation panel (all pass tokens x kc k) stays in L2 for every pair of the m-block. C
// accumulators live in a per-thread fp32 buffer between chunks (spilled exactly, so every variant and blocking
// gives the same bits). While a panel is used, the next one is prefetched into L2 (weights come from DRAM).
// v2 is the special case of one pair per m-block and 16 k-blocks per chunk (x streamed once per 32 rows).
struct Slot {
  const uint16_t* w;  // row-major [R, K]
  int64_t R;
  int64_t r;          // first row of the 16-row block
  bool on;
};

constexpr int64_t kMaxPairs = 64;

// Grow-only, 64-byte aligned per-thread scratch (the pool's threads are persistent: no steady-state allocation).
struct Scratch {
  void* p = nullptr;
  size_t size = 0;
  ~Scratch() { std::free(p); }
  void* Get(size_t bytes) {
    if (bytes > size) {
      std::free(p);
      size = (bytes + 4095) & ~size_t{4095};
      p = std::aligned_alloc(64, size);
      if (!p) size = 0;
    }
    return p;
  }
};
thread_local Scratch tl_panel, tl_cs;

inline void PackPanel(const Slot& s, int64_t K, int64_t kb0, int64_t nkb, int which, uint16_t* panel) {
  for (int64_t kbi = 0; kbi < nkb; ++kbi) {
    uint16_t* dst = panel + (kbi * 2 + which) * 512;
    const int64_t c0 = (kb0 + kbi) * 32;
    const int64_t cols = Min(32, K - c0);
    for (int64_t i = 0; i < 16; ++i) {
      const int64_t row = s.r + i;
      if (row < s.R && cols == 32) {
        std::memcpy(dst + i * 32, s.w + row * K + c0, 64);
      } else {
        for (int64_t c = 0; c < 32; ++c) dst[i * 32 + c] = (row < s.R && c < cols) ? s.w[row * K + c0 + c] : 0;
      }
    }
  }
}

// Prefetch rows [i0, i1) of the 32 rows of a pair (slot 0 rows 0-15, slot 1 rows 16-31), k-blocks
// [kb0, kb0 + nkb), into L2.
inline void PrefetchRows(const Slot& s0, const Slot& s1, int64_t K, int64_t kb0, int64_t nkb, int64_t i0,
                         int64_t i1) {
  const int64_t c0 = kb0 * 32, c1 = Min(K, (kb0 + nkb) * 32);
  for (int64_t i = i0; i < i1; ++i) {
    const Slot& s = i < 16 ? s0 : s1;
    const int64_t row = s.r + (i & 15);
    if (!s.on || row >= s.R) continue;
    const char* p = reinterpret_cast<const char*>(s.w + row * K);
    for (int64_t c = c0; c < c1; c += 32) __builtin_prefetch(p + c * 2, 0, 2);
  }
}

// The 2x2 micro-kernel over nkb k-blocks: C0 += A0 B0, C1 += A1 B0, C2 += A0 B1, C3 += A1 B1 (tiles 0-3), A0/A1
// at a0/a1 + kb * a_step (row stride a_stride bytes), B0/B1 at b0/b1 + kb * 512. Tile registers are not renamed: a load into a tile
// waits for the products that read it. So each load is issued right after the last product that reads its
// register, one k-block ahead, and overlaps the remaining products (each C still sees its k-blocks in order,
// so the bits are those of the plain loop).
inline void Kernel2x2(const uint16_t* a0, const uint16_t* a1, int64_t a_step, int64_t a_stride, const uint16_t* b0,
                      const uint16_t* b1, int64_t nkb) {
  TILE_LOADD(4, a0, a_stride);
  TILE_LOADD(6, b0, 64);
  TILE_LOADD(5, a1, a_stride);
  TILE_LOADD(7, b1, 64);
  for (int64_t kb = 0; kb + 1 < nkb; ++kb) {
    const int64_t off = (kb + 1) * a_step;
    TILE_DPBF16PS(0, 4, 6);
    TILE_DPBF16PS(2, 4, 7);
    TILE_LOADD(4, a0 + off, a_stride);
    TILE_DPBF16PS(1, 5, 6);
    TILE_LOADD(6, b0 + (kb + 1) * 512, 64);
    TILE_DPBF16PS(3, 5, 7);
    TILE_LOADD(5, a1 + off, a_stride);
    TILE_LOADD(7, b1 + (kb + 1) * 512, 64);
  }
  TILE_DPBF16PS(0, 4, 6);
  TILE_DPBF16PS(2, 4, 7);
  TILE_DPBF16PS(1, 5, 6);
  TILE_DPBF16PS(3, 5, 7);
}

// For pairs j < np and token tiles [p0, p1): C[j][tile][slot] = A(pair j, slot) x act over all of K; then
// epi(j, tile, c_slot0, c_slot1) per pair and tile.
template <typename Epi>
void BlockedGemm(const Slot* s0, const Slot* s1, int64_t np, const uint16_t* act, int64_t K, int64_t p0,
                 int64_t p1, int64_t kc, Epi epi) {
  const int64_t kb_total = NumKBlocks(K), ntp = p1 - p0, nq = (ntp + 1) / 2;
  uint16_t* panel = static_cast<uint16_t*>(tl_panel.Get(static_cast<size_t>(kc) * 2048));
  float* cs = static_cast<float*>(tl_cs.Get(static_cast<size_t>(np * ntp) * 2048));
  for (int64_t kb0 = 0; kb0 < kb_total; kb0 += kc) {
    const int64_t nkb = Min(kc, kb_total - kb0);
    for (int64_t j = 0; j < np; ++j) {
      PackPanel(s0[j], K, kb0, nkb, 0, panel);
      if (s1[j].on) PackPanel(s1[j], K, kb0, nkb, 1, panel);
      // the panel used next: pair j + 1 of this chunk, or pair 0 of the next chunk
      const bool pf = g_amx_prefetch && (j + 1 < np || kb0 + kc < kb_total);
      const int64_t jn = j + 1 < np ? j + 1 : 0, kbn = j + 1 < np ? kb0 : kb0 + kc;
      const int64_t nkbn = Min(kc, kb_total - kbn);
      for (int64_t tt = p0; tt < p1; tt += 2) {
        const bool two = tt + 1 < p1;
        float* c0 = cs + (j * ntp + (tt - p0)) * 512;  // [pair][tile][slot][256]
        float* c1 = c0 + 512;
        if (kb0 == 0) {
          TILE_ZERO(0);
          TILE_ZERO(1);
          TILE_ZERO(2);
          TILE_ZERO(3);
        } else {
          TILE_LOADD(0, c0, 64);
          if (s1[j].on) TILE_LOADD(1, c0 + 256, 64);
          if (two) {
            TILE_LOADD(2, c1, 64);
            if (s1[j].on) TILE_LOADD(3, c1 + 256, 64);
          }
        }
        if (pf) {
          const int64_t q = (tt - p0) / 2;
          PrefetchRows(s0[jn], s1[jn], K, kbn, nkbn, 32 * q / nq, 32 * (q + 1) / nq);
        }
        if (two && s1[j].on && g_amx_pipeline) {
          Kernel2x2(panel, panel + 512, 1024, 64, act + (tt * kb_total + kb0) * 512,
                    act + ((tt + 1) * kb_total + kb0) * 512, nkb);
        } else {
          for (int64_t kbi = 0; kbi < nkb; ++kbi) {
            TILE_LOADD(4, panel + (kbi * 2) * 512, 64);
            TILE_LOADD(6, act + (tt * kb_total + kb0 + kbi) * 512, 64);
            TILE_DPBF16PS(0, 4, 6);
            if (s1[j].on) {
              TILE_LOADD(5, panel + (kbi * 2 + 1) * 512, 64);
              TILE_DPBF16PS(1, 5, 6);
            }
            if (two) {
              TILE_LOADD(7, act + ((tt + 1) * kb_total + kb0 + kbi) * 512, 64);
              TILE_DPBF16PS(2, 4, 7);
              if (s1[j].on) TILE_DPBF16PS(3, 5, 7);
            }
          }
        }
        TILE_STORED(0, c0, 64);
        if (s1[j].on) TILE_STORED(1, c0 + 256, 64);
        if (two) {
          TILE_STORED(2, c1, 64);
          if (s1[j].on) TILE_STORED(3, c1 + 256, 64);
        }
      }
    }
  }
  for (int64_t j = 0; j < np; ++j)
    for (int64_t tt = p0; tt < p1; ++tt) {
      const float* c = cs + (j * ntp + (tt - p0)) * 512;
      epi(j, tt, c, c + 256);
    }
}

// Blocking of a call with nt token tiles: v2 (one pair, 16 k-blocks, 16 token tiles) or the tunables (v3).
// Auto chunk: the activation chunk of a pass (pass tokens x kc x 32 k, bf16 = pass tiles x kc KiB) about
// 1 MiB, so it stays in L2 (2 MiB) next to the C buffer and the panel; measured best at n = 64-512.
struct Blocking {
  int64_t kc, pairs, pass;
};
inline Blocking GetBlocking(bool v2, int64_t rows_per_pair, int64_t nt) {
  if (v2) return {16, 1, 16};
  int64_t pairs = (g_amx_mb + rows_per_pair - 1) / rows_per_pair;
  pairs = pairs < 1 ? 1 : (pairs > kMaxPairs ? kMaxPairs : pairs);
  const int64_t pass = g_amx_pass < 1 ? 1 : g_amx_pass;
  int64_t kc = g_amx_kc;
  if (kc < 1) {
    kc = 1024 / Min(pass, nt);
    kc = kc < 8 ? 8 : (kc > 64 ? 64 : kc);
  }
  return {kc, pairs, pass};
}

void Phase1Blocked(const uint16_t* x, int64_t n, int64_t hidden, const uint16_t* w1, const uint16_t* w3,
                   int64_t F, int64_t r0, int64_t r1, uint16_t* h, bool v2) {
  const int64_t nt = NumTiles(n), kb_h = NumKBlocks(F);
  const Blocking b = GetBlocking(v2, 16, nt);
  Slot s0[kMaxPairs], s1[kMaxPairs];
  for (int64_t p0 = 0; p0 < nt; p0 += b.pass) {
    const int64_t p1 = Min(nt, p0 + b.pass);
    for (int64_t rb = r0; rb < r1; rb += 16 * b.pairs) {
      const int64_t np = Min(b.pairs, (r1 - rb + 15) / 16);
      for (int64_t j = 0; j < np; ++j) {
        s0[j] = Slot{w1, F, rb + 16 * j, true};
        s1[j] = Slot{w3, F, rb + 16 * j, true};
      }
      BlockedGemm(s0, s1, np, x, hidden, p0, p1, b.kc, [&](int64_t j, int64_t tt, const float* g, const float* u) {
        const int64_t r = rb + 16 * j;
        SiluStore(g, u, Min(16, r1 - r), r, tt, kb_h, h);
      });
    }
  }
}

void Phase2Blocked(const uint16_t* h, int64_t n, int64_t F, const uint16_t* w2, int64_t hidden, int64_t r0,
                   int64_t r1, OutView o, bool v2) {
  const int64_t nt = NumTiles(n);
  const Blocking b = GetBlocking(v2, 32, nt);
  Slot s0[kMaxPairs], s1[kMaxPairs];
  for (int64_t p0 = 0; p0 < nt; p0 += b.pass) {
    const int64_t p1 = Min(nt, p0 + b.pass);
    for (int64_t rb = r0; rb < r1; rb += 32 * b.pairs) {
      const int64_t np = Min(b.pairs, (r1 - rb + 31) / 32);
      for (int64_t j = 0; j < np; ++j) {
        const int64_t r = rb + 32 * j;
        s0[j] = Slot{w2, hidden, r, true};
        s1[j] = Slot{w2, hidden, r + 16, r + 16 < r1};
      }
      BlockedGemm(s0, s1, np, h, F, p0, p1, b.kc, [&](int64_t j, int64_t tt, const float* c0, const float* c1) {
        const int64_t t0 = tt * 16, toks = Min(16, n - t0);
        for (int slot = 0; slot < (s1[j].on ? 2 : 1); ++slot) {
          const float* c = slot ? c1 : c0;
          const int64_t i0 = s0[j].r + 16 * slot, rows = Min(16, r1 - i0);
          for (int64_t q = 0; q < toks; ++q) {
            for (int64_t i = 0; i < rows; ++i) {
              const float v = c[i * 16 + q];
              if (o.f32) {
                static_cast<float*>(o.data)[(t0 + q) * o.ld + i0 + i] = v;
              } else {
                static_cast<uint16_t*>(o.data)[(t0 + q) * o.ld + i0 + i] = F32ToBf16(v);
              }
            }
          }
        }
      });
    }
  }
}

// The variant of a call with nt token tiles: 1 direct, 2 chunked (v2), 3 blocked (v3).
inline int Variant(int64_t nt) {
  if (g_amx_variant >= 1 && g_amx_variant <= 3) return g_amx_variant;
  return nt >= g_amx_blocked_from ? 3 : 1;
}

size_t ActBytes(int64_t n, int64_t k) { return static_cast<size_t>(NumTiles(n) * NumKBlocks(k)) * 1024; }

void Pack(const uint16_t* x, int64_t k, const int32_t* idx, int64_t n, int64_t t0, int64_t t1, void* act) {
  uint16_t* dst = static_cast<uint16_t*>(act);
  const int64_t kb = NumKBlocks(k), kpad = kb * 32;
  for (int64_t t = t0; t < t1; ++t) {
    const uint16_t* src = x + (idx ? idx[t] : t) * k;
    for (int64_t c = 0; c < kpad; ++c) dst[ActIndex(t, c, kb)] = c < k ? src[c] : 0;
  }
  if (t1 == n) {
    for (int64_t t = n; t < NumTiles(n) * 16; ++t)
      for (int64_t c = 0; c < kpad; ++c) dst[ActIndex(t, c, kb)] = 0;
  }
}

// ---- v1: A tiles loaded in place from the weight rows (best for one or two token tiles).
void Phase1Direct(const uint16_t* x, int64_t n, int64_t hidden, const uint16_t* w1, const uint16_t* w3,
                  int64_t F, int64_t r0, int64_t r1, uint16_t* h) {
  const int64_t nt = NumTiles(n), kb_x = NumKBlocks(hidden), kb_h = NumKBlocks(F);
  const int64_t group = GroupTiles(kb_x);
  const bool in_place = g_amx_pipeline && hidden % 32 == 0;  // every A tile loads from the rows themselves
  alignas(64) uint16_t abuf1[512], abuf3[512];
  alignas(64) float c[4][256];
  for (int64_t tg = 0; tg < nt; tg += group) {
    const int64_t tg_end = Min(nt, tg + group);
    for (int64_t r = r0; r < r1; r += 16) {
      const int64_t rows = Min(16, r1 - r);
      for (int64_t tt = tg; tt < tg_end; tt += 2) {
        const bool two = tt + 1 < tg_end;
        TILE_ZERO(0);
        TILE_ZERO(1);
        TILE_ZERO(2);
        TILE_ZERO(3);
        if (two && in_place && r + 16 <= F) {
          Kernel2x2(w1 + r * hidden, w3 + r * hidden, 32, hidden * 2, x + tt * kb_x * 512, x + (tt + 1) * kb_x * 512,
                    kb_x);
        } else {
        for (int64_t kb = 0; kb < kb_x; ++kb) {
          int64_t s1, s3;
          const uint16_t* a1 = ATile(w1, F, hidden, r, kb, abuf1, &s1);
          const uint16_t* a3 = ATile(w3, F, hidden, r, kb, abuf3, &s3);
          TILE_LOADD(4, a1, s1);
          TILE_LOADD(5, a3, s3);
          TILE_LOADD(6, x + (tt * kb_x + kb) * 512, 64);
          TILE_DPBF16PS(0, 4, 6);
          TILE_DPBF16PS(1, 5, 6);
          if (two) {
            TILE_LOADD(7, x + ((tt + 1) * kb_x + kb) * 512, 64);
            TILE_DPBF16PS(2, 4, 7);
            TILE_DPBF16PS(3, 5, 7);
          }
        }
        }
        TILE_STORED(0, c[0], 64);
        TILE_STORED(1, c[1], 64);
        if (two) {
          TILE_STORED(2, c[2], 64);
          TILE_STORED(3, c[3], 64);
        }
        for (int half = 0; half < (two ? 2 : 1); ++half) SiluStore(c[2 * half], c[2 * half + 1], rows, r, tt + half, kb_h, h);
      }
    }
  }
}

void Phase1(const void* x_act, int64_t n, int64_t hidden, const uint16_t* w1, const uint16_t* w3,
            int64_t F, int64_t r0, int64_t r1, void* h_act) {
  const uint16_t* x = static_cast<const uint16_t*>(x_act);
  uint16_t* h = static_cast<uint16_t*>(h_act);
  const int64_t nt = NumTiles(n), kb_h = NumKBlocks(F);
  ConfigureTiles();
  const int v = Variant(nt);
  if (v == 1) {
    Phase1Direct(x, n, hidden, w1, w3, F, r0, r1, h);
  } else {
    Phase1Blocked(x, n, hidden, w1, w3, F, r0, r1, h, v == 2);
  }
  if (r1 == F) {  // zero the k-padding of h (columns F .. 32*kb_h) for every token, padding tokens included
    for (int64_t t = 0; t < nt * 16; ++t)
      for (int64_t j = F; j < kb_h * 32; ++j) h[ActIndex(t, j, kb_h)] = 0;
  }
  TILE_RELEASE();
}

void Phase2Direct(const uint16_t* h, int64_t n, int64_t F, const uint16_t* w2, int64_t hidden, int64_t r0,
                  int64_t r1, OutView o) {
  const int64_t nt = NumTiles(n), kb_h = NumKBlocks(F);
  const int64_t group = GroupTiles(kb_h);
  const bool in_place = g_amx_pipeline && F % 32 == 0;
  alignas(64) uint16_t abuf0[512], abuf1[512];
  alignas(64) float c[4][256];
  for (int64_t tg = 0; tg < nt; tg += group) {
    const int64_t tg_end = Min(nt, tg + group);
    for (int64_t r = r0; r < r1; r += 32) {
      const bool two_a = r + 16 < r1;
      for (int64_t tt = tg; tt < tg_end; tt += 2) {
        const bool two_b = tt + 1 < tg_end;
        TILE_ZERO(0);
        TILE_ZERO(1);
        TILE_ZERO(2);
        TILE_ZERO(3);
        if (two_a && two_b && in_place && r + 32 <= hidden) {
          Kernel2x2(w2 + r * F, w2 + (r + 16) * F, 32, F * 2, h + tt * kb_h * 512, h + (tt + 1) * kb_h * 512, kb_h);
        } else {
        for (int64_t kb = 0; kb < kb_h; ++kb) {
          int64_t s0, s1;
          const uint16_t* a0 = ATile(w2, hidden, F, r, kb, abuf0, &s0);
          TILE_LOADD(4, a0, s0);
          TILE_LOADD(6, h + (tt * kb_h + kb) * 512, 64);
          TILE_DPBF16PS(0, 4, 6);
          if (two_a) {
            const uint16_t* a1 = ATile(w2, hidden, F, r + 16, kb, abuf1, &s1);
            TILE_LOADD(5, a1, s1);
            TILE_DPBF16PS(1, 5, 6);
          }
          if (two_b) {
            TILE_LOADD(7, h + ((tt + 1) * kb_h + kb) * 512, 64);
            TILE_DPBF16PS(2, 4, 7);
            if (two_a) TILE_DPBF16PS(3, 5, 7);
          }
        }
        }
        TILE_STORED(0, c[0], 64);
        if (two_a) TILE_STORED(1, c[1], 64);
        if (two_b) TILE_STORED(2, c[2], 64);
        if (two_a && two_b) TILE_STORED(3, c[3], 64);
        for (int blk = 0; blk < 4; ++blk) {
          const int a = blk & 1, b = blk >> 1;
          if ((a && !two_a) || (b && !two_b)) continue;
          const int64_t i0 = r + 16 * a, t0 = (tt + b) * 16;
          const int64_t rows = Min(16, r1 - i0), toks = Min(16, n - t0);
          for (int64_t q = 0; q < toks; ++q) {
            for (int64_t i = 0; i < rows; ++i) {
              const float v = c[blk][i * 16 + q];
              if (o.f32) {
                static_cast<float*>(o.data)[(t0 + q) * o.ld + i0 + i] = v;
              } else {
                static_cast<uint16_t*>(o.data)[(t0 + q) * o.ld + i0 + i] = F32ToBf16(v);
              }
            }
          }
        }
      }
    }
  }
}

void Phase2(const void* h_act, int64_t n, int64_t F, const uint16_t* w2, int64_t hidden, int64_t r0,
            int64_t r1, OutView o) {
  const uint16_t* h = static_cast<const uint16_t*>(h_act);
  ConfigureTiles();
  const int v = Variant(NumTiles(n));
  if (v == 1) {
    Phase2Direct(h, n, F, w2, hidden, r0, r1, o);
  } else {
    Phase2Blocked(h, n, F, w2, hidden, r0, r1, o, v == 2);
  }
  TILE_RELEASE();
}

}  // namespace

const PathKernels kKernels = {"amx", false, 32, ActBytes, Pack, Phase1, Phase2};

}  // namespace amx
}  // namespace fiddler
