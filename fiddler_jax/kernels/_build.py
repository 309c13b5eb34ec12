"""cffi build script (API mode, out of line) for the CPU expert kernel: setup.py's ``cffi_modules`` runs it
during ``pip install`` and compiles ``xla_ffi/*.cc`` into ``fiddler_jax.kernels._fiddler_ffi`` against the
XLA FFI headers of the installed jaxlib. Each instruction-set path is compiled from its own file under a
``#pragma GCC target``, so the extension loads on any x86-64 and picks a path at run time.

By hand (from the repository root): ``python fiddler_jax/kernels/_build.py`` builds the module in place.
"""
from __future__ import annotations

import glob
import os
import shutil

import cffi
import jax.ffi

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))
_SRC = os.path.join(_ROOT, "xla_ffi")

# Kept in step with xla_ffi/capi.h (cffi's parser needs plain C declarations).
CDEF = """
typedef struct XLA_FFI_Error XLA_FFI_Error;
typedef struct XLA_FFI_CallFrame XLA_FFI_CallFrame;
XLA_FFI_Error* FiddlerExpertFfn(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FiddlerGroupedExpertFfn(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FiddlerStreamedBeginCpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FiddlerStreamedEndCpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FiddlerStreamedBeginCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* FiddlerStreamedEndCuda(XLA_FFI_CallFrame* call_frame);

int fj_cpu_feature_bits(void);
int fj_physical_cores(void);
int fj_logical_cpus(void);
int fj_path_supported(int path);
int fj_set_path(int path);
int fj_get_path(void);
int fj_path_for_tokens(int64_t n);
void fj_set_amx_min_tokens(int64_t n);
void fj_set_quant_dense_min_tokens(int64_t n);
int64_t fj_get_amx_min_tokens(void);
int fj_set_num_threads(int64_t n, int pin, char* err, int err_len);
int fj_reset_num_threads(char* err, int err_len);
int fj_max_threads(void);
int fj_get_num_threads(char* err, int err_len);
int fj_set_pool(int64_t spin_us, int wait_all, int64_t streamed_spin_us, char* err, int err_len);
void fj_set_prefetch_bytes(int bytes);
void fj_set_amx_group_kib(int kib);
void fj_set_amx_variant(int variant);
void fj_set_amx_blocking(int kc, int mb, int pass_, int prefetch, int blocked_from, int pipeline);
int fj_read_probe(const uint64_t* p, const int64_t* bytes, int64_t n, uint64_t* sum, char* err, int err_len);
int fj_expert_ffn(const uint16_t* x, int64_t n, int64_t hidden, int64_t ffn, const uint16_t* w1,
                  const uint16_t* w3, const uint16_t* w2, void* y, int out_f32, char* err, int err_len);
int fj_grouped_expert_ffn(const uint16_t* x, int64_t T, int64_t hidden, int64_t ffn, int64_t E,
                          const int32_t* token_idx, const int32_t* expert_idx, const float* weights, int64_t A,
                          const uint16_t* w1, const uint16_t* w3, const uint16_t* w2, void* y, int out_f32,
                          char* err, int err_len);
int fj_grouped_expert_ffn_tables(const uint16_t* x, int64_t T, int64_t hidden, int64_t ffn, int64_t E,
                                 const int32_t* token_idx, const int32_t* expert_idx, const float* weights,
                                 int64_t A, int format, int64_t group1, int64_t group2, const uint64_t* w1,
                                 const uint64_t* s1, const uint64_t* w3, const uint64_t* s3, const uint64_t* w2,
                                 const uint64_t* s2, void* y, int out_f32, char* err, int err_len);
int64_t fj_streamed_lane_register(int64_t E, int64_t hidden, int64_t ffn, int format, int64_t group1,
                                  int64_t group2, const uint64_t* w1, const uint64_t* s1, const uint64_t* w3,
                                  const uint64_t* s3, const uint64_t* w2, const uint64_t* s2);
void fj_streamed_lane_unregister(int64_t id);
int fj_streamed_lane_error(char* err, int err_len);
typedef struct FjStreamedRecord {
  int64_t tables, tokens, assignments, experts, start_ns, end_ns;
  uint16_t counts[256];
  int64_t gpu_ns[4];
} FjStreamedRecord;
int64_t fj_streamed_lane_records(FjStreamedRecord* out, int64_t capacity, int64_t* dropped);
int64_t fj_monotonic_ns(void);
int64_t fj_streamed_lane_abandon(void);
void fj_streamed_lane_set_timing(int on);
"""


def _relative(path: str) -> str:
    # setuptools rejects absolute source paths (builds run from the repository root); a build by hand runs
    # inside cffi's temporary directory, so it gets absolute ones.
    return path if __name__ == "__main__" else os.path.relpath(path, os.getcwd())


ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "fiddler_jax.kernels._fiddler_ffi",
    '#include "capi.h"\n',
    source_extension=".cpp",
    sources=[_relative(p) for p in sorted(glob.glob(os.path.join(_SRC, "*.cc")))],
    include_dirs=[jax.ffi.include_dir(), _relative(_SRC)],
    extra_compile_args=["-std=c++17", "-O3", "-fno-strict-aliasing", "-fvisibility=hidden", "-pthread"],
    extra_link_args=["-pthread", "-ldl"],
    language="c++",
)

if __name__ == "__main__":
    # Intermediate files go to build/ (ignored); the extension is copied next to this file.
    built = ffibuilder.compile(tmpdir=os.path.join(_ROOT, "build", "cffi"), verbose=True)
    target = os.path.join(_HERE, os.path.basename(built))
    # a new file renamed over the old one: a process that has the old library loaded keeps its pages (copying
    # over it in place would change the code under that process)
    shutil.copy(built, target + ".new")
    os.replace(target + ".new", target)
    print("built", target)
