"""The CPU lane: offloaded experts computed where they live, in pinned host memory.

``cpu_expert_mix`` is the lane's arithmetic: float32 [N, hidden] = Σ weight · FFN_expert(moe_in[token]) over the
step's CPU assignments. A bfloat16 model's experts (bfloat16, or int8 / int4 ``QuantizedMatrix``) run through our
C++ kernel (every expert of the call at once, over all cores, reading the weights in place); a float32 model's
(parity runs) through numpy in float32, quantised ones dequantised first. ``xla_expert_mix`` is the same through
XLA's own CPU dot (``cpu_backend="xla"``, the ablation baseline).

``CpuLane`` runs one layer step's share: the activations come to the host (with the step's sync for small steps,
else fetched; large ones by one DMA into pinned memory, :mod:`fiddler_jax.runtime.pinned_activations`), the
kernel runs over the pinned expert views, and the output goes back as numpy or, for large outputs, from a
pinned buffer the kernel wrote into. It runs on the calling thread or on the lane's worker thread (the kernel
releases the GIL), as the executor decides.
"""
from __future__ import annotations

import concurrent.futures

import jax
import jax.numpy as jnp
import numpy as np

from fiddler_jax.models.quantization import QuantizedMatrix, dequantize
from fiddler_jax.runtime.host_experts import HostExperts
from fiddler_jax.runtime.pinned_activations import PinnedActivations

PINNED_MIN_BYTES = 1 << 20  # CPU-lane activations from this size take the pinned path (on a GPU)


def cpu_expert_mix(moe_in: np.ndarray, token: np.ndarray, expert: np.ndarray, weight: np.ndarray,
                   tables: tuple[list, list, list], prepared=None, out: np.ndarray | None = None) -> np.ndarray:
    """The module docstring's mix, with ``tables`` = (w1s, w3s, w2s) per-expert host arrays (None where an expert
    is not on the host). ``prepared``: the same tables as ``kernels.ExpertTables`` made once, which skips the
    per-call checks. ``out``: where to write the result (every row is written), else a new array."""
    kernel = prepared is not None or (len(token) > 0 and moe_in.dtype != np.float32)
    if out is None:
        out = np.zeros(moe_in.shape, np.float32)
    elif not (kernel and len(token)):  # the kernel writes every row; numpy accumulates into zeros
        out[...] = 0.0
    if len(token) == 0:
        return out
    w1s, w3s, w2s = tables
    if not kernel:
        for e in np.unique(expert):
            rows = expert == e
            x = moe_in[token[rows]]
            w1, w3, w2 = (dense(t[e], np.float32) for t in (w1s, w3s, w2s))
            gate, up = x @ w1.T, x @ w3.T
            y = (gate / (1 + np.exp(-gate)) * up) @ w2.T
            np.add.at(out, token[rows], y * weight[rows, None])
        return out
    from fiddler_jax.kernels import grouped_expert_ffn_numpy

    if prepared is not None:
        w1s, w3s, w2s = prepared, None, None
    return grouped_expert_ffn_numpy(np.ascontiguousarray(moe_in), token.astype(np.int32), expert.astype(np.int32),
                                    weight.astype(np.float32), w1s, w3s, w2s, out=out)


def dense(w, dtype) -> np.ndarray:
    """A held matrix as a plain array: itself, or a quantised one's W' (float32 q · scale, then ``dtype``)."""
    return dequantize(w).astype(dtype) if isinstance(w, QuantizedMatrix) else w


@jax.jit
def _xla_expert_ffn(x, w1, w3, w2):
    f32 = jnp.float32
    gate = jnp.dot(x, w1.T, preferred_element_type=f32)
    up = jnp.dot(x, w3.T, preferred_element_type=f32)
    return jnp.dot((jax.nn.silu(gate) * up).astype(x.dtype), w2.T, preferred_element_type=f32)


def xla_expert_mix(moe_in: np.ndarray, token: np.ndarray, expert: np.ndarray, weight: np.ndarray,
                   tables: tuple[list, list, list]) -> np.ndarray:
    """The mix through XLA's CPU dot: each expert's FFN is a jitted computation on the JAX CPU device over the
    same pinned weights (``device_put`` of an aligned host view aliases it, no copy; quantised experts are
    dequantised to a copy first)."""
    cpu = jax.devices("cpu")[0]
    out = np.zeros(moe_in.shape, np.float32)
    for e in np.unique(expert):
        rows = expert == e
        x = jax.device_put(np.ascontiguousarray(moe_in[token[rows]]), cpu)
        y = np.asarray(_xla_expert_ffn(x, *(jax.device_put(dense(t[e], moe_in.dtype), cpu) for t in tables)))
        np.add.at(out, token[rows], y * weight[rows, None])
    return out


class CpuLane:
    """One engine's CPU lane over the host experts (module docstring). ``backend``: "kernel" or "xla";
    ``pinned_activations``: large activations cross PCIe through pinned memory (only on a GPU: a CPU-only JAX has
    no PCIe copy to save); ``clock``: the trace's clock, for the lane's span."""

    def __init__(self, host: HostExperts, device: jax.Device, backend: str, pinned_activations: bool, clock):
        self.host, self.backend, self.clock = host, backend, clock
        gpu = device.platform == "gpu"
        self.pinned = PinnedActivations(device, PINNED_MIN_BYTES if pinned_activations and gpu else None)
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None

    def output_pinned(self, layer: int, shape) -> bool:
        """Whether this step's output goes through a pinned buffer: the kernel writes it (bfloat16 experts,
        ``kernel`` backend) and it is large enough."""
        return self.backend == "kernel" and self.pinned.wants(shape) and self.host.kernel_tables(layer) is not None

    def run(self, layer: int, moe_in, token, expert, weight):
        """The lane's share of one layer step; returns the float32 output (numpy, or a device array already on its
        way from a pinned buffer) and the lane's (start, end)."""
        start = self.clock()
        x = self.pinned.fetch(moe_in)
        if self.backend == "xla":
            out = xla_expert_mix(x, token, expert, weight, self.host.tables(layer))
        elif self.output_pinned(layer, moe_in.shape):
            buffer = self.pinned.take(moe_in.shape)
            cpu_expert_mix(x, token, expert, weight, self.host.tables(layer), self.host.kernel_tables(layer),
                           out=buffer.view)
            out = self.pinned.to_device(buffer)
        else:
            out = cpu_expert_mix(x, token, expert, weight, self.host.tables(layer), self.host.kernel_tables(layer))
        return out, (start, self.clock())

    def submit(self, job) -> concurrent.futures.Future:
        """Run ``job`` on the lane's worker thread."""
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fiddler-cpu-lane")
        return self._worker.submit(job)

    def settle(self) -> None:
        """The end of a forward pass: the pinned output copies have landed and hold no GPU memory."""
        self.pinned.settle()

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
