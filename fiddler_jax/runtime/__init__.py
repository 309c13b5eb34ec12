"""Running the model: plain generation (``generate``, ``beam_search``), and the hybrid engine -- its facade
(``engine``), options, resources, jitted segments, step loop, executor, lanes and planning, with placement,
profiling, the latency model and its calibration, and the trace."""
