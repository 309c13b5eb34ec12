"""The lanes a planned layer step runs on, each owning its own state: the GPU (resident experts), the CPU
(the kernel over pinned host experts), the PCIe lane (copies into staging slots), the dynamic cache (its
state and its buffers) and the streamed CPU lane (steps that need no plan run as device-stream work)."""
