"""The JAX memory kinds the engine places arrays in (``jax.sharding.SingleDeviceSharding(device, memory_kind=...)``):
a GPU device exposes ``device`` (its own memory) and ``pinned_host`` (page-locked host memory it reaches by DMA;
``np.asarray`` of such an array is a zero-copy view). The CPU device exposes both too, so CI runs the same code."""
from __future__ import annotations

DEVICE = "device"
PINNED_HOST = "pinned_host"
