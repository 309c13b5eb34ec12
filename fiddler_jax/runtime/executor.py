"""Run one planned layer step over the lanes.

Given the step's plan, its routing (on the device and, from the step's sync, on the host) and the resident
experts' mix already queued, the executor runs:
  * the GPU lane: the dynamic cache's hits and inserts, then the PCIe lane's copies in plan order, in batches
    of the free staging rows, each batch one copy call and one mix call (:mod:`lanes.pcie`); the prefetched
    copies the plan uses are mixed with the first batch (concurrent plans) or on their own before the copies
    (sequential plans, or no copies);
  * the CPU lane: the kernel over the step's CPU assignments;
  * when the plan leaves the PCIe lane idle and the planner prefetches, the first copies of the next layer's
    predicted experts (:func:`fiddler_jax.runtime.planning.plan_prefetch`).
A concurrent plan (``fiddler_overlap``, ``cpu_only``, ...) runs the three at once: the calling thread queues the
GPU work without waiting, then runs the CPU lane itself -- or, when the plan copies (the thread then times the
copies) or ``cpu_lane_thread`` is set, leaves it to the lane's worker thread. A sequential plan (``fiddler``, the
paper's execution) runs GPU, PCIe, then CPU, each waiting for the one before. It returns the GPU lanes' sum (on
the device), the CPU lane's output (numpy, or a device array from a pinned buffer) and each lane's span.
"""
from __future__ import annotations

import functools

import numpy as np

from fiddler_jax.runtime.lanes.cache import DynamicCache
from fiddler_jax.runtime.lanes.cpu import CpuLane
from fiddler_jax.runtime.lanes.gpu import GpuLane
from fiddler_jax.runtime.lanes.pcie import PcieLane
from fiddler_jax.runtime.latency import LatencyModel
from fiddler_jax.runtime.planning import Lane, Plan, plan_prefetch
from fiddler_jax.runtime.routing_sync import StepSync


class Executor:
    """One engine's lanes, and how a plan runs over them (module docstring). ``prefetch``: next-layer experts
    copied ahead per layer step (0: none); ``clock``: the trace's clock."""

    def __init__(self, gpu: GpuLane, cpu: CpuLane, pcie: PcieLane, cache: DynamicCache | None,
                 latency: LatencyModel, prefetch: int, cpu_lane_thread: bool, clock):
        self.gpu, self.cpu, self.pcie, self.cache = gpu, cpu, pcie, cache
        self.latency, self.prefetch, self.cpu_lane_thread, self.clock = latency, prefetch, cpu_lane_thread, clock

    def run(self, layer: int, plan: Plan, step: StepSync, moe_in, routing, resident: tuple[float, object],
            spans: dict, next_layer_offloads: bool):
        """Run ``plan``; ``resident``: (queued at, the resident mix); ``spans``: the step's spans so far, filled in;
        ``next_layer_offloads``: the next layer has experts a prefetch could copy. Returns (GPU sum, CPU output)."""
        clock = self.clock
        experts, weights = step.experts, step.weights
        host_in = moe_in if step.moe_in is None else step.moe_in
        on_cpu = (plan.lanes[experts] == Lane.CPU) & (weights != 0)  # weight 0: a row's padding, no work
        job = cpu_job = None
        if on_cpu.any():
            token, slot = np.nonzero(on_cpu)
            job = functools.partial(self.cpu.run, layer, host_in, token, experts[token, slot], weights[token, slot])
            if plan.concurrent and (len(plan.transfer_order) or self.cache is not None or self.cpu_lane_thread):
                cpu_job = self.cpu.submit(job)
        t_gpu, gpu_out = resident
        staged = np.flatnonzero(plan.staged)  # prefetched copies: their mix waits for them on the device
        order = plan.transfer_order
        if self.cache is not None:
            gpu_out, order = self.cache.run(layer, moe_in, routing, plan, gpu_out, clock, spans)
        if len(staged) and not (len(order) and plan.concurrent):  # else mixed with the first copied batch
            gpu_out, staged = self.pcie.mix(layer, staged, moe_in, routing, gpu_out), ()
        if len(order):
            if not plan.concurrent:
                gpu_out.block_until_ready()  # sequential: the GPU lane ends before the PCIe lane starts
            spans.setdefault("pcie", (clock(),) * 2)
            gpu_out = self.pcie.copy_and_mix(layer, moe_in, routing, order, gpu_out, staged)
        elif self.prefetch and next_layer_offloads:
            pool = self.pcie.pool
            E = len(plan.lanes)
            self.pcie.prefetch(layer + 1, plan_prefetch(
                step.predicted, self.gpu.resident[layer + 1], pool.staged(layer + 1, E), self.latency,
                free_slots=pool.free(), prefetch=self.prefetch, step_s=plan.predicted_s,
                pcie_backlog_s=pool.backlog_s()))
        if "pcie" in spans:  # wait for the copies alone (the mixes after them are the GPU lane's)
            self.pcie.pool.wait(layer)
            if self.cache is not None:
                self.cache.wait(layer)
            spans["pcie"] = (spans["pcie"][0], clock())
        cpu_out = self.gpu.zeros(moe_in.shape, host=not self.cpu.output_pinned(layer, moe_in.shape))
        if job is not None and cpu_job is None and plan.concurrent:
            cpu_out, spans["cpu"] = job()  # inline: the GPU span below then ends when the calling thread looks
        gpu_out.block_until_ready()
        spans["gpu"] = (t_gpu, clock())
        self.pcie.pool.release(layer)  # the GPU work reading this layer's copies is done
        if job is not None and "cpu" not in spans:
            cpu_out, spans["cpu"] = cpu_job.result() if cpu_job is not None else job()
        return gpu_out, cpu_out
