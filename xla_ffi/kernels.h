// The per-path compute kernels behind the expert FFN. Everything here is plain compute on raw pointers: no
// XLA, no threads, no allocation. The driver (expert_ffn.cc) splits rows over threads and calls these.
//
// The expert FFN  y = (silu(x W1^T) * (x W3^T)) W2^T  runs in two phases, each of the form "activations times
// the transpose of a row-major weight matrix", so every weight row (w1/w3: [ffn, hidden], w2: [hidden, ffn],
// HF layout) is streamed once, contiguously, for all tokens of the call:
//   phase 1, rows j of ffn:    h[t, j] = silu(<x_t, w1_j>) * <x_t, w3_j>
//   phase 2, rows i of hidden: y[t, i] = <h_t, w2_i>
// Each path keeps activations (x after packing, h) in its own layout ("act"): bf16 row-major for AVX512_BF16,
// fp32 row-major for AVX2 and generic, 16x32 VNNI tiles for AMX. A path may read x in place (direct_x).
// Every output element is computed by exactly one call with a fixed operation order, so results do not
// depend on how rows are split over threads.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fiddler {

enum class Path : int { kAuto = 0, kGeneric = 1, kAvx2 = 2, kAvx512Bf16 = 3, kAmx = 4 };
constexpr int kNumPaths = 5;

// Where phase 2 writes y[t, i]: data + t * ld + i, as fp32 or bf16.
struct OutView {
  void* data;
  int64_t ld;
  bool f32;
};

struct PathKernels {
  const char* name;
  bool direct_x;    // phase 1 can read x [n, hidden] bf16 row-major in place (no pack needed)
  int row_granule;  // preferred multiple for row splits (a split anywhere is still correct)
  // Bytes of the packed activation buffer for n tokens of width k.
  size_t (*act_bytes)(int64_t n, int64_t k);
  // Pack tokens [t0, t1) of n: row t of the packed buffer <- x[idx ? idx[t] : t, :]. The call with t1 == n
  // also writes any padding the layout needs.
  void (*pack)(const uint16_t* x, int64_t k, const int32_t* idx, int64_t n, int64_t t0, int64_t t1,
               void* act);
  // Phase 1 for ffn rows [r0, r1) of F. x_act: packed x (or x itself when direct_x). h_act: packed [n, F].
  // The call with r1 == F also writes padding columns of h_act.
  void (*phase1)(const void* x_act, int64_t n, int64_t hidden, const uint16_t* w1, const uint16_t* w3,
                 int64_t F, int64_t r0, int64_t r1, void* h_act);
  // Phase 2 for hidden rows [r0, r1): y[t, i] = <h_t, w2_i>.
  void (*phase2)(const void* h_act, int64_t n, int64_t F, const uint16_t* w2, int64_t hidden, int64_t r0,
                 int64_t r1, OutView out);
};

// Returns the kernels of a path; nullptr for kAuto. Callers must check CPU support first.
const PathKernels* GetPathKernels(Path path);

// Quantised expert weights (fiddler_jax/models/quantization.py states the formats):
//   kInt8: data int8 [rows, k], scales float32 [rows] (one per row);
//   kInt4: data uint8 [rows, k / 2] (element 2j in the low nibble, 2j + 1 in the high, two's complement),
//          scales float16 [rows, k / group] (group = k when k is shorter than a group).
// A kernel computes with the exact weights q[r, c] * scale (the GPU's dequantised expert FFN rounds them to bf16
// first: the lanes agree to bf16 rounding, as for bf16 experts). Phases as above.
enum class WeightFormat : int { kBf16 = 0, kInt8 = 1, kInt4 = 2 };

struct QuantMatrix {
  const void* data;
  const void* scales;
  WeightFormat format;
  int64_t group;  // kInt4: inputs per scale
};

struct QuantKernels {
  void (*phase1)(const void* x_act, int64_t n, int64_t hidden, const QuantMatrix& w1, const QuantMatrix& w3,
                 int64_t F, int64_t r0, int64_t r1, void* h_act);
  void (*phase2)(const void* h_act, int64_t n, int64_t F, const QuantMatrix& w2, int64_t hidden, int64_t r0,
                 int64_t r1, OutView out);
};

// The quantised phases of a path, in that path's activation layout; nullptr where the path has none (AVX2 and
// AMX: quantised calls run on AVX512_BF16, or generic where the CPU lacks it).
const QuantKernels* GetQuantKernels(Path path);

namespace generic { extern const QuantKernels kQuantKernels; }
namespace avx512 {
extern const QuantKernels kQuantKernels;
// Rows [r0, r1) of a quantised [rows, k] matrix as bf16 W' = bf16(q * scale) (nearest even), row-major into
// out [(r1 - r0), k]: what a bf16 path computes with when a quantised call has many tokens (expert_ffn.cc).
void DequantRowsBf16(const QuantMatrix& m, int64_t k, int64_t r0, int64_t r1, uint16_t* out);
}  // namespace avx512

namespace generic { extern const PathKernels kKernels; }
namespace avx2 { extern const PathKernels kKernels; }
namespace avx512 { extern const PathKernels kKernels; }
namespace amx { extern const PathKernels kKernels; }

// Tunables read by the kernels (set by the runtime; plain globals, read-only during a call).
extern int g_prefetch_bytes;  // AVX paths: weight rows are prefetched into L2 this many bytes ahead; 0 = off
extern int g_amx_group_kib;   // AMX direct variant: activation bytes re-read per weight row block
extern int g_amx_variant;     // AMX: 0 auto, 1 direct (A tiles in place), 2 k-chunked, 3 blocked (kernel_amx.cc)
extern int g_amx_blocked_from;  // AMX auto: blocked variant from this many 16-token tiles, else direct
extern int g_amx_kc;            // AMX blocked: k-blocks (32 k) per chunk
extern int g_amx_mb;            // AMX blocked: weight rows per m-block
extern int g_amx_pass;          // AMX blocked: token tiles per pass
extern int g_amx_prefetch;      // AMX blocked: prefetch the next weight panel into L2 (0/1)
extern int g_amx_pipeline;      // AMX blocked: software-pipelined 2x2 micro-kernel (0/1)

}  // namespace fiddler
