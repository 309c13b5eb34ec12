"""CPU expert kernels for the Fiddler CPU lane: a fused SwiGLU expert FFN in C++ (xla_ffi/), registered with
jax.ffi for platform "cpu" at import.

Paths, chosen per call from the CPU features and the token count: AVX512_BF16 (vdpbf16ps; decode and small
batches, memory-bound), AMX-BF16 (many tokens), AVX2/FMA (portable fallback), generic scalar (any x86-64).
Force one with ``set_kernel_path`` or FIDDLER_KERNEL_PATH=avx512_bf16|amx|avx2|generic|auto.
"""
from fiddler_jax.kernels._lib import (
    PATHS,
    ExpertTables,
    KernelError,
    cpu_features,
    expert_ffn_numpy,
    get_kernel_path,
    get_num_threads,
    grouped_expert_ffn_numpy,
    max_threads,
    path_for_tokens,
    path_supported,
    read_bandwidth,
    read_checksum,
    reset_num_threads,
    set_amx_min_tokens,
    set_kernel_path,
    set_num_threads,
    set_pool,
    set_quant_dense_min_tokens,
    set_tuning,
)
from fiddler_jax.kernels._ops import expert_ffn, grouped_expert_ffn

__all__ = [
    "PATHS",
    "ExpertTables",
    "KernelError",
    "cpu_features",
    "expert_ffn",
    "expert_ffn_numpy",
    "get_kernel_path",
    "get_num_threads",
    "grouped_expert_ffn",
    "grouped_expert_ffn_numpy",
    "max_threads",
    "path_for_tokens",
    "path_supported",
    "read_bandwidth",
    "read_checksum",
    "reset_num_threads",
    "set_amx_min_tokens",
    "set_kernel_path",
    "set_num_threads",
    "set_pool",
    "set_quant_dense_min_tokens",
    "set_tuning",
]
