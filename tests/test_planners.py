"""Planners: the paper's rule, the makespan search against brute force, baselines, the LRU cache, the plan memo, bad
input."""
from __future__ import annotations

import dataclasses
import itertools
import os

import numpy as np
import pytest

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.experiments.common import CONF_DIR as _CONF_ROOT
from fiddler_jax.experiments.schemas import PlannerConfig, planner_from_config
from fiddler_jax.runtime import planning as P
from fiddler_jax.runtime.latency import LatencyModel, PiecewiseLinear
from fiddler_jax.runtime.planning import (
    PLANNER_NAMES, POLICIES, CacheState, CacheStates, Lane, Plan, PlannerError, get_planner, plan_cpu_only,
    plan_fiddler, plan_fiddler_overlap, plan_gpu_only, plan_prefetch, plan_transfer,
)

LAT = LatencyModel.from_design_numbers()
MS = 1e-3
CONF_DIR = os.path.join(_CONF_ROOT, "planner")


def none_resident(e=8):
    return np.zeros(e, bool)


def reference_makespan(lat, counts, on_gpu, transfer_seq, slots):
    """Concurrent makespan by direct simulation (written apart from the module): resident GPU work first, copies
    back to back in ``transfer_seq`` order, copy i waits for slot i % slots to be free, CPU lane in parallel;
    a copy takes transfer_busy_s when the CPU lane has work, else transfer_s."""
    active = [e for e in range(len(counts)) if counts[e] > 0]
    gpu_t = sum(lat.gpu(counts[e]) for e in active if on_gpu[e])
    cpu_t = sum(lat.cpu(counts[e]) for e in active if not on_gpu[e] and e not in transfer_seq)
    copy = lat.copy_beside_cpu_s if cpu_t > 0 else lat.transfer_s
    copy_end, slot_busy_until = 0.0, [0.0] * slots
    for i, e in enumerate(transfer_seq):
        copy_end = max(copy_end, slot_busy_until[i % slots]) + copy
        gpu_t = max(gpu_t, copy_end) + lat.gpu(counts[e])
        slot_busy_until[i % slots] = gpu_t
    return lat.sync_s + max(cpu_t, gpu_t)


def random_case(rng, e=8):
    kind = rng.choice(["decode", "beam", "prefill", "mixed"])
    if kind == "decode":
        counts = np.zeros(e, int)
        counts[rng.choice(e, 2, replace=False)] = 1
    elif kind == "beam":
        counts = rng.multinomial(2 * int(rng.integers(2, 9)), np.ones(e) / e)
    elif kind == "prefill":
        counts = rng.multinomial(2 * int(rng.integers(100, 2000)), rng.dirichlet(np.ones(e)))
    else:
        counts = rng.integers(0, 700, e) * (rng.random(e) < 0.7)
    return counts, rng.random(e) < rng.uniform(0, 0.6)


# --- fiddler: the paper's Algorithm 1 ---------------------------------------------------------------------

def test_fiddler_sends_one_decode_token_to_the_cpu():
    counts = np.array([1, 0, 0, 0, 0, 0, 0, 1])
    resident = np.array([False, False, False, False, False, False, False, True])
    plan = plan_fiddler(counts, resident, LAT)
    assert plan.lanes.tolist() == [Lane.CPU, 0, 0, 0, 0, 0, 0, Lane.GPU]
    assert plan.predicted_s == pytest.approx(0.3 * MS + 3.5 * MS + 0.15 * MS)
    assert not plan.concurrent and plan.transfer_order.size == 0


def test_fiddler_copies_a_300_token_prefill_expert():
    counts = np.array([300, 0, 0, 1])
    plan = plan_fiddler(counts, np.zeros(4, bool), LAT)
    assert plan.lanes.tolist() == [Lane.TRANSFER, Lane.IDLE, Lane.IDLE, Lane.CPU]
    assert plan.transfer_order.tolist() == [0]
    expected = LAT.sync_s + LAT.transfer_s + LAT.gpu(300) + LAT.cpu(1)  # lanes one after another
    assert plan.predicted_s == pytest.approx(expected)
    assert plan.lane_busy_s == pytest.approx({"gpu": LAT.gpu(300), "cpu": LAT.cpu(1), "pcie": LAT.transfer_s})


def test_fiddler_rule_is_strict_at_the_crossover():
    crossover = next(n for n in range(1, 600) if LAT.transfer_s + LAT.gpu(n) < LAT.cpu(n))
    below = plan_fiddler(np.array([crossover - 1]), none_resident(1), LAT)
    at = plan_fiddler(np.array([crossover]), none_resident(1), LAT)
    assert below.lanes[0] == Lane.CPU and at.lanes[0] == Lane.TRANSFER
    assert 30 < crossover < 60  # the design numbers: copying wins from a few dozen tokens


def test_fiddler_keeps_the_largest_savings_when_slots_run_out():
    counts = np.array([100, 500, 300, 0])
    plan = plan_fiddler(counts, none_resident(4), LAT, staging_slots=2)
    assert plan.lanes.tolist() == [Lane.CPU, Lane.TRANSFER, Lane.TRANSFER, Lane.IDLE]
    assert plan.transfer_order.tolist() == [1, 2]  # longest GPU work first


# --- fiddler_overlap: makespan across concurrent lanes ----------------------------------------------------

def test_overlap_beats_fiddler_when_both_lanes_help():
    counts = np.array([1, 1, 0, 0, 0, 0, 0, 0])  # decode: two offloaded experts, one token each
    paper = plan_fiddler(counts, none_resident(), LAT)
    ours = plan_fiddler_overlap(counts, none_resident(), LAT)
    assert sorted(ours.lanes[:2].tolist()) == [Lane.CPU, Lane.TRANSFER]
    assert paper.predicted_s == pytest.approx(0.3 * MS + 7.0 * MS)
    assert ours.predicted_s == pytest.approx(0.3 * MS + 6.4 * MS + 0.15 * MS)
    assert ours.predicted_s < paper.predicted_s


def test_overlap_never_worse_than_fiddler_or_cpu_only_on_random_steps():
    rng = np.random.default_rng(0)
    strictly_better = 0
    for _ in range(300):
        counts, resident = random_case(rng)
        slots = int(rng.integers(1, 5))
        max_transfers = None if rng.random() < 0.5 else int(rng.integers(0, 9))
        kw = dict(staging_slots=slots, max_transfers=max_transfers)
        ours = plan_fiddler_overlap(counts, resident, LAT, **kw)
        assert ours.predicted_s <= plan_fiddler(counts, resident, LAT, **kw).predicted_s + 1e-12
        assert ours.predicted_s <= plan_cpu_only(counts, resident, LAT).predicted_s + 1e-12
        strictly_better += ours.predicted_s < plan_fiddler(counts, resident, LAT, **kw).predicted_s - 1e-9
    assert strictly_better > 100


def test_overlap_prediction_matches_a_direct_simulation():
    rng = np.random.default_rng(1)
    for _ in range(100):
        counts, resident = random_case(rng)
        slots = int(rng.integers(1, 4))
        plan = plan_fiddler_overlap(counts, resident, LAT, staging_slots=slots, max_transfers=8)
        assert plan.predicted_s == pytest.approx(
            reference_makespan(LAT, counts, resident, plan.transfer_order.tolist(), slots), rel=1e-12)


@pytest.mark.parametrize("latency", ["design", "gpu_slower_than_copy", "copies_slower_beside_cpu"])
def test_exact_search_is_optimal_over_every_assignment_and_copy_order(latency):
    lat = {"design": LAT, "gpu_slower_than_copy": dataclasses.replace(LAT, gpu=PiecewiseLinear((1, 512), (1 * MS, 40 * MS))),
           "copies_slower_beside_cpu": dataclasses.replace(LAT, transfer_busy_s=3 * LAT.transfer_s)}[latency]
    rng = np.random.default_rng(2)
    for _ in range(40):
        counts = rng.integers(0, 600, 5) * (rng.random(5) < 0.8)
        resident = rng.random(5) < 0.2
        plan = plan_fiddler_overlap(counts, resident, lat, staging_slots=4, max_transfers=4)
        candidates = [e for e in range(5) if counts[e] > 0 and not resident[e]]
        best = min(reference_makespan(lat, counts, resident, list(seq), 4)
                   for k in range(min(4, len(candidates)) + 1) for seq in itertools.permutations(candidates, k))
        assert plan.predicted_s == pytest.approx(best, rel=1e-12)


def qwen3_decode_step():
    """One decode token of a 128-expert top-8 layer with 26 resident experts, two of the token's eight among
    them, and the H100 machine's Qwen3-30B-A3B costs: CPU 0.13 ms an expert, GPU 0.05 ms, sync 0.05 ms, a copy
    0.5 ms alone (18.8 GB/s) and 1.0 ms beside the CPU lane (9.2 GB/s, both measured there)."""
    resident = np.zeros(128, bool)
    resident[:26] = True
    counts = np.zeros(128, int)
    counts[[3, 11, 40, 52, 77, 90, 101, 127]] = 1
    lat = dataclasses.replace(LAT, cpu=PiecewiseLinear((1, 8), (0.13 * MS, 0.3 * MS)),
                              gpu=PiecewiseLinear((1, 8), (0.05 * MS, 0.06 * MS)), transfer_s=0.5 * MS,
                              transfer_busy_s=1.0 * MS, sync_s=0.05 * MS)
    return counts, resident, lat


def test_a_copy_beside_cpu_work_costs_transfer_busy_s():
    """A decode step with six offloaded experts (0.78 ms of CPU): a copy alone (0.5 ms) would shorten it
    beside the other five, so a model without the contention copies one; at 1.0 ms beside the CPU lane no copy
    pays, and the step stays on the streamed lane. A plan whose CPU lane is idle copies at transfer_s."""
    counts, resident, lat = qwen3_decode_step()
    blind = dataclasses.replace(lat, transfer_busy_s=lat.transfer_s)
    assert len(plan_fiddler_overlap(counts, resident, blind, streamable=True).transfer_order) >= 1
    plan = plan_fiddler_overlap(counts, resident, lat, streamable=True)
    assert len(plan.transfer_order) == 0 and plan.predicted_s == pytest.approx(6 * 0.13 * MS)
    everything = plan_transfer(counts, resident, lat, staging_slots=8)
    assert everything.lane_busy_s["cpu"] == 0 and everything.lane_busy_s["pcie"] == pytest.approx(6 * lat.transfer_s)
    one_copy = plan_fiddler_overlap(counts, resident, lat, max_transfers=1)  # synced: the sync is paid anyway
    assert one_copy.predicted_s == pytest.approx(
        reference_makespan(lat, counts, resident, one_copy.transfer_order.tolist(), 2), rel=1e-12)


def test_a_layer_streams_once_the_planner_pays_what_a_synced_step_really_costs():
    """The 80a82b6 run's numbers (a copy 0.73 ms beside the CPU lane): at the calibrated round trip (0.05 ms) the
    routing with all eight experts offloaded is planned with a copy, so the layer can never stream; charged the
    engine's synced-step cost (about 1.2 ms a step on the H100: synced 2.09 against streamed 0.89 ms, 2cddf9a),
    no routing copies and every step of the layer streams."""
    from fiddler_jax.runtime.planning.streamed_steps import all_cpu_by_bound, all_cpu_for_any_routing

    _, resident, lat = qwen3_decode_step()
    measured = dataclasses.replace(lat, transfer_busy_s=0.73 * MS)

    def streams(latency):
        return all_cpu_for_any_routing(
            lambda c: plan_fiddler_overlap(c, resident, latency, streamable=True), resident, tokens=1, top_k=8)

    assert not streams(measured)
    eight = np.zeros(128, int)
    eight[120:] = 1  # all offloaded
    assert len(plan_fiddler_overlap(eight, resident, measured, streamable=True).transfer_order) == 1
    charged = dataclasses.replace(measured, sync_s=1.2 * MS)
    assert streams(charged)
    assert all_cpu_by_bound(P.get_planner("fiddler_overlap"), charged, resident, tokens=1, top_k=8)


def test_greedy_agrees_with_exhaustive_search():
    rng = np.random.default_rng(3)
    gaps = []
    for _ in range(150):
        counts, resident = random_case(rng)
        kw = dict(staging_slots=int(rng.integers(1, 4)), max_transfers=int(rng.integers(0, 9)))
        exact = plan_fiddler_overlap(counts, resident, LAT, **kw)
        greedy = plan_fiddler_overlap(counts, resident, LAT, exact_limit=0, **kw)
        flat = plan_fiddler_overlap(np.minimum(counts, 128), resident, LAT, **kw)  # GPU time flat up to 128
        flat_greedy = plan_fiddler_overlap(np.minimum(counts, 128), resident, LAT, exact_limit=0, **kw)
        assert flat_greedy.predicted_s == pytest.approx(flat.predicted_s, rel=1e-12)  # provably optimal there
        assert greedy.predicted_s >= exact.predicted_s - 1e-12
        gaps.append(greedy.predicted_s / exact.predicted_s - 1)
    assert max(gaps) < 0.01


def test_greedy_on_many_experts_is_fast_and_respects_fiddler():
    rng = np.random.default_rng(4)
    counts = rng.integers(0, 40, 64) * (rng.random(64) < 0.5)
    resident = rng.random(64) < 0.2
    plan = plan_fiddler_overlap(counts, resident, LAT, max_transfers=64)  # beyond exact_limit: greedy
    assert plan.predicted_s <= plan_fiddler(counts, resident, LAT, max_transfers=64).predicted_s
    assert plan.lanes.shape == (64,) and plan.lanes.dtype == np.int8


# --- prefetched copies (staged_s) and plan_prefetch ------------------------------------------------------

def reference_staged_makespan(lat, counts, on_gpu, staged_s, use, transfer_seq, slots):
    """Concurrent makespan with prefetched copies, by direct simulation: resident GPU work, then the used staged
    experts in landing order (each after its copy lands), then the new copies, which queue on the PCIe lane
    behind every staged copy and use the slots the staged copies leave free."""
    active = [e for e in range(len(counts)) if counts[e] > 0]
    staged = [e for e in range(len(counts)) if np.isfinite(staged_s[e])]
    gpu_t = sum(lat.gpu(counts[e]) for e in active if on_gpu[e])
    cpu_t = sum(lat.cpu(counts[e]) for e in active if not on_gpu[e] and e not in use and e not in transfer_seq)
    for e in sorted(use, key=lambda e: (staged_s[e], e)):
        gpu_t = max(gpu_t, staged_s[e]) + lat.gpu(counts[e])
    free = slots - len(staged)
    copy = lat.copy_beside_cpu_s if cpu_t > 0 else lat.transfer_s
    copy_end, slot_busy_until = max([staged_s[e] for e in staged], default=0.0), [0.0] * max(free, 1)
    for i, e in enumerate(transfer_seq):
        copy_end = max(copy_end, slot_busy_until[i % free]) + copy
        gpu_t = max(gpu_t, copy_end) + lat.gpu(counts[e])
        slot_busy_until[i % free] = gpu_t
    return lat.sync_s + max(cpu_t, gpu_t)


def test_a_landed_prefetch_runs_on_the_gpu_and_a_late_one_on_the_cpu():
    counts = np.array([1, 0, 1, 0, 0, 0, 0, 0])
    staged = np.full(8, np.inf)
    staged[2] = 0.0
    plan = plan_fiddler_overlap(counts, none_resident(), LAT, staged_s=staged)
    assert plan.lanes[2] == Lane.GPU and plan.staged[2] and not plan.staged[0] and 2 not in plan.transfer_order
    assert plan.lanes[0] == Lane.CPU
    assert plan.predicted_s == pytest.approx(LAT.sync_s + max(LAT.cpu(1), LAT.gpu(1)))
    staged[2] = 10 * LAT.cpu(1) + 1.0  # lands long after the CPU would be done with both
    late = plan_fiddler_overlap(counts, none_resident(), LAT, staged_s=staged)
    assert late.lanes[2] == Lane.CPU and not late.staged.any()
    # a staged expert without tokens is not used; staged_s of a resident expert is ignored
    idle = plan_fiddler_overlap(np.array([1, 0, 0, 0, 0, 0, 0, 0]), none_resident(), LAT, staged_s=np.zeros(8))
    assert idle.staged.tolist() == [True] + [False] * 7
    with pytest.raises(PlannerError, match="staged_s"):
        plan_fiddler_overlap(counts, none_resident(), LAT, staged_s=np.full(8, np.nan))
    with pytest.raises(PlannerError, match="staged_s"):
        plan_fiddler_overlap(counts, none_resident(), LAT, staged_s=np.zeros(3))
    with pytest.raises(PlannerError, match="staging_slots must be at least 1"):
        plan_fiddler_overlap(counts, none_resident(), LAT, staging_slots=0)


def test_prefetched_plans_are_optimal_and_match_a_direct_simulation():
    rng = np.random.default_rng(7)
    # copies that sometimes win (faster still with the CPU lane idle), so every branch is taken
    lat = dataclasses.replace(LAT, transfer_s=2.5 * MS, transfer_busy_s=3.5 * MS)
    for _ in range(200):
        counts, resident = random_case(rng, e=6)
        staged_s = np.where(rng.random(6) < 0.4, rng.uniform(0, 8 * MS, 6), np.inf)
        staged_s[rng.random(6) < 0.3] = 0.0
        staged_s[resident] = np.inf
        slots = int(rng.integers(1, 4))
        n_staged = int(np.isfinite(staged_s).sum())
        plan = plan_fiddler_overlap(counts, resident, lat, staging_slots=slots + n_staged, max_transfers=3,
                                    staged_s=staged_s)
        use = np.flatnonzero(plan.staged).tolist()
        assert all(np.isfinite(staged_s[e]) and counts[e] > 0 for e in use)
        assert plan.predicted_s == pytest.approx(reference_staged_makespan(
            lat, counts, resident, staged_s, use, plan.transfer_order.tolist(), slots + n_staged), rel=1e-12)
        staged_active = [e for e in range(6) if counts[e] > 0 and np.isfinite(staged_s[e])]
        others = [e for e in range(6) if counts[e] > 0 and not resident[e] and not np.isfinite(staged_s[e])]
        best = min(reference_staged_makespan(lat, counts, resident, staged_s, list(u), list(seq), slots + n_staged)
                   for r in range(len(staged_active) + 1) for u in itertools.combinations(staged_active, r)
                   for k in range(min(3, len(others)) + 1) for seq in itertools.permutations(others, k))
        assert plan.predicted_s == pytest.approx(best, rel=1e-12)


def test_staged_copies_take_their_staging_slots():
    counts = np.array([400, 400, 0, 0])
    staged = np.array([np.inf, np.inf, 0.0, np.inf])  # an unused copy still holds the only slot
    plan = plan_fiddler_overlap(counts, none_resident(4), LAT, staging_slots=1, staged_s=staged)
    assert len(plan.transfer_order) == 0
    assert len(plan_fiddler_overlap(counts, none_resident(4), LAT, staging_slots=1).transfer_order) > 0


def test_plan_prefetch_picks_the_most_predicted_experts_not_on_the_gpu():
    predicted = np.array([1, 0, 3, 1, 2, 0])
    on_gpu = np.array([False, False, True, False, False, False])
    staged = np.array([False, False, False, True, False, False])
    far = dict(step_s=1.0)  # every copy lands in time

    def pick(**kw):
        return plan_prefetch(predicted, on_gpu, staged, LAT, **{**far, **kw}).tolist()

    assert pick(free_slots=2, prefetch=3) == [4, 0]
    assert pick(free_slots=2, prefetch=1) == [4]
    assert pick(free_slots=0, prefetch=3) == []
    assert plan_prefetch(np.zeros(6, int), on_gpu, staged, LAT, free_slots=2, prefetch=2, **far).size == 0
    with pytest.raises(PlannerError, match="prefetch must be non-negative"):
        pick(free_slots=2, prefetch=-1)
    with pytest.raises(PlannerError, match="one shape"):
        plan_prefetch(predicted[:3], on_gpu, staged, LAT, free_slots=2, prefetch=1)


def test_plan_prefetch_copies_only_what_lands_before_the_cpu_would_be_done():
    """The k-th copy lands at backlog + k transfers; it pays while that is within the step and the CPU time of
    the expert's predicted tokens."""
    predicted = np.array([2, 1, 0, 0])
    none = np.zeros(4, bool)
    t, cpu2, cpu1 = LAT.transfer_s, float(LAT.cpu(2)), float(LAT.cpu(1))
    exact = dict(free_slots=4, prefetch=4)
    assert plan_prefetch(predicted, none, none, LAT, step_s=t - cpu2, **exact).tolist() == [0]
    assert plan_prefetch(predicted, none, none, LAT, step_s=t - cpu2 - 1e-6, **exact).tolist() == []
    assert plan_prefetch(predicted, none, none, LAT, step_s=2 * t - cpu1, **exact).tolist() == [0, 1]
    assert plan_prefetch(predicted, none, none, LAT, step_s=2 * t - cpu1, pcie_backlog_s=1e-3, **exact).tolist() == [0]


def test_prefetch_is_a_fiddler_overlap_option():
    assert get_planner("fiddler_overlap").prefetch == 0
    assert get_planner("fiddler_overlap", prefetch=1).prefetch == 1
    assert get_planner("fiddler").prefetch == 0 and get_planner("cpu_only").prefetch == 0
    with pytest.raises(PlannerError, match="cannot prefetch"):
        get_planner("cpu_only", prefetch=1)
    with pytest.raises(PlannerError, match="cannot prefetch"):
        get_planner("fiddler_overlap", prefetch=1, cache_slots=1)
    with pytest.raises(PlannerError, match="non-negative integer"):
        get_planner("fiddler_overlap", prefetch=-2)
    assert planner_from_config(PlannerConfig(name="fiddler_overlap", prefetch=2)).prefetch == 2


# --- baselines and staging slots ----------------------------------------------------------------------

def test_cpu_only_and_transfer_and_gpu_only():
    counts = np.array([3, 0, 200, 1])
    resident = np.array([True, False, False, False])
    assert plan_cpu_only(counts, resident, LAT).lanes.tolist() == [Lane.GPU, Lane.IDLE, Lane.CPU, Lane.CPU]
    assert plan_transfer(counts, resident, LAT).lanes.tolist() == [Lane.GPU, Lane.IDLE, Lane.TRANSFER,
                                                                     Lane.TRANSFER]
    assert plan_gpu_only(counts, np.array([True, False, True, True]), LAT).lanes.tolist() == [1, 0, 1, 1]
    with pytest.raises(PlannerError, match=r"experts \[2, 3\].*gpu_budget"):
        plan_gpu_only(counts, resident, LAT)


def test_transfer_reuses_staging_slots_and_counts_the_waits():
    counts = np.array([10, 10, 10, 10, 10])
    one = plan_transfer(counts, none_resident(5), LAT, staging_slots=1)
    two = plan_transfer(counts, none_resident(5), LAT, staging_slots=2)
    g, t = LAT.gpu(10), LAT.transfer_s
    assert one.predicted_s == pytest.approx(LAT.sync_s + 5 * (t + g))  # one slot: copy, compute, copy, ...
    assert two.predicted_s == pytest.approx(LAT.sync_s + 5 * t + g)  # double buffering hides the compute
    assert two.transfer_slots.tolist() == [0, 1, 0, 1, 0]
    sequential = plan_transfer(counts, none_resident(5), LAT, staging_slots=2, concurrent=False)
    assert sequential.predicted_s == pytest.approx(one.predicted_s)


def test_plans_respect_the_staging_slot_count():
    rng = np.random.default_rng(5)
    for _ in range(100):
        counts, resident = random_case(rng)
        slots = int(rng.integers(1, 4))
        for name in ("fiddler", "fiddler_overlap"):
            plan = get_planner(name, staging_slots=slots)(counts, resident, LAT)
            assert (plan.lanes == Lane.TRANSFER).sum() <= slots
        for name in ("fiddler", "fiddler_overlap", "transfer", "lru"):
            plan = get_planner(name, staging_slots=slots, max_transfers=None if name in ("transfer", "lru") else 8)(
                counts, resident, LAT)
            assert np.all(plan.transfer_slots < slots)
            assert sorted(plan.transfer_order.tolist()) == plan.experts(Lane.TRANSFER).tolist()


# --- the dynamic cache -----------------------------------------------------------------------------------

def decode_step(*experts, e=8):
    counts = np.zeros(e, int)
    counts[list(experts)] = 1
    return counts


def test_lru_hit_miss_sequence():
    lru = get_planner("lru", cache_slots=2)
    cache = CacheStates(lru.cache_slots)
    resident = none_resident()
    resident[7] = True
    log = []
    for experts in [(0, 1), (0, 2), (1, 2), (2, 7), (3, 4), (3, 7)]:
        plan = cache.plan(lru, decode_step(*experts), resident, LAT)
        hits = [e for e in experts if plan.cached[e]]
        misses = plan.experts(Lane.TRANSFER).tolist()
        log.append((hits, misses, sorted(e for e in cache.layers[0].experts if e >= 0)))
    assert log == [
        ([], [0, 1], [0, 1]),  # cold: both copied; 0 inserted before 1
        ([0], [2], [0, 2]),  # 0 hits; 1 is least recently used and evicted
        ([2], [1], [1, 2]),  # 0 was used before 2: evicted
        ([2], [], [1, 2]),  # 7 is resident: not a cache hit, never inserted
        ([], [3, 4], [3, 4]),  # two misses evict both
        ([3], [], [3, 4]),
    ]
    assert plan.lanes[7] == Lane.GPU and not plan.cached[7]


def test_cache_state_rules():
    state = CacheState.empty(2)
    plan = plan_transfer(np.array([5, 3, 9, 0]), none_resident(4), LAT)  # copy order by count: 2, 0, 1
    after = state.after(plan)
    assert plan.transfer_order.tolist() == [2, 0, 1]
    assert sorted(after.experts) == [0, 1]  # three copies, two slots: the last two copied stay
    assert after.mask(4).tolist() == [True, True, False, False]
    assert CacheState.empty(0).after(plan).experts == ()


def test_cache_is_per_layer_and_resets():
    lru = get_planner("lru", cache_slots=1)
    cache = CacheStates(lru.cache_slots)
    cache.plan(lru, decode_step(0), none_resident(), LAT, layer=0)
    plan = cache.plan(lru, decode_step(0), none_resident(), LAT, layer=1)
    assert plan.lanes[0] == Lane.TRANSFER  # layer 1 has its own cache
    assert cache.plan(lru, decode_step(0), none_resident(), LAT, layer=0).cached[0]
    cache.reset()
    assert cache.plan(lru, decode_step(0), none_resident(), LAT, layer=0).lanes[0] == Lane.TRANSFER
    # the planner itself holds no state: the same call gives the same plan
    assert lru(decode_step(0), none_resident(), LAT, layer=0).lanes[0] == Lane.TRANSFER


def test_cache_under_fiddler_overlap():
    planner = get_planner("fiddler_overlap", cache_slots=2)
    assert planner.cache_slots == 2 and planner.name == "fiddler_overlap+cache"
    cache = CacheStates(planner.cache_slots)
    first = cache.plan(planner, decode_step(0, 1), none_resident(), LAT)
    copied = first.experts(Lane.TRANSFER).tolist()
    assert len(copied) == 1 and first.planner == "fiddler_overlap+cache"
    second = cache.plan(planner, decode_step(0, 1), none_resident(), LAT)
    assert second.lanes[copied[0]] == Lane.GPU and second.cached[copied[0]]
    assert second.predicted_s < first.predicted_s


# --- the plan memo: canonical steps, plans relabeled back --------------------------------------------------

MEMO_PLANNERS = [("fiddler", {}), ("fiddler", {"max_transfers": 1}), ("fiddler_overlap", {}),
                 ("fiddler_overlap", {"exact_limit": 3, "max_transfers": 2}), ("fiddler_overlap", {"prefetch": 2}),
                 ("cpu_only", {}), ("transfer", {}), ("gpu_only", {})]


def memo_step(rng, experts, top_k):
    """A routing's counts (1-8 tokens, top-k) and, for half the steps, landing times of staged copies (some
    equal, some landed, some none) rounded as the memo rounds them."""
    tokens = int(rng.integers(1, 9))
    counts = np.zeros(experts, np.int64)
    for _ in range(tokens):
        counts[rng.choice(experts, top_k, replace=False)] += 1
    if rng.random() < 0.5:
        return counts, None
    staged_s = np.full(experts, np.inf)
    staged_s[rng.choice(experts, 3, replace=False)] = rng.choice([0.0, 1.25 * MS, 1.25 * MS, 4.0 * MS], 3)
    return counts, np.ceil(staged_s * 4e3) / 4e3


@pytest.mark.parametrize("name,params", MEMO_PLANNERS, ids=[f"{n}{p}" for n, p in MEMO_PLANNERS])
@pytest.mark.parametrize("experts,top_k", [(8, 2), (64, 8), (128, 8)])
def test_memo_plan_is_the_planners_plan(name, params, experts, top_k):
    """The memo plans the canonical step and relabels the plan back: the same lanes, copy order and staged and
    cached experts as the planner called directly (its ties follow orders the canonical labeling keeps), the same
    predicted time up to the order of float sums."""
    rng = np.random.default_rng(experts + len(params))
    latencies = [LAT, dataclasses.replace(LAT, transfer_s=1.0 * MS), dataclasses.replace(LAT, transfer_s=0.1)]
    planner = get_planner(name, **params)
    resident = rng.random((4, experts)) < 0.3
    if name == "gpu_only":
        resident[:] = True
    for latency in latencies:
        memo = P.PlanMemo(planner, resident, latency)
        for _ in range(40):
            layer = int(rng.integers(4))
            counts, staged_s = memo_step(rng, experts, top_k)
            if not planner.prefetch:
                staged_s = None
            got, want = memo(counts, layer, staged_s), planner(counts, resident[layer], latency, staged_s=staged_s)
            for field in ("counts", "lanes", "transfer_order", "staged", "cached"):
                np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
            assert got.predicted_s == pytest.approx(want.predicted_s, rel=1e-12)
            assert got.lane_busy_s == pytest.approx(want.lane_busy_s, rel=1e-12)
            assert (got.planner, got.concurrent, got.staging_slots) == (want.planner, want.concurrent,
                                                                          want.staging_slots)


def test_memo_hits_for_permuted_counts_and_keeps_landing_times_apart():
    calls = []
    planner = get_planner("fiddler_overlap", prefetch=2)

    def counted(*args, **kwargs):
        calls.append(args[0])
        return planner(*args, **kwargs)

    rng = np.random.default_rng(3)
    resident = np.zeros((2, 128), bool)
    resident[0, rng.choice(128, 40, replace=False)] = True
    resident[1, rng.choice(128, 40, replace=False)] = True  # another layer, as many resident experts
    memo = P.PlanMemo(counted, resident, LAT)
    on, off = np.flatnonzero(resident[0]), np.flatnonzero(~resident[0])
    for _ in range(20):  # 3 tokens top-8: 5 on resident experts, counts 3 2 2 1 1 1 1 1 1 1 offloaded
        counts = np.zeros(128, np.int64)
        counts[rng.choice(on, 5, replace=False)] = 1
        counts[rng.choice(off, 10, replace=False)] = [3, 2, 2, 1, 1, 1, 1, 1, 1, 1]
        plan = memo(counts, 0)
        np.testing.assert_array_equal(plan.lanes, planner(counts, resident[0], LAT).lanes)
    assert len(calls) == 1
    counts = np.zeros(128, np.int64)
    counts[np.flatnonzero(resident[1])[:5]] = 1
    counts[np.flatnonzero(~resident[1])[:10]] = [1, 1, 1, 3, 1, 2, 1, 1, 2, 1]
    memo(counts, 1)
    assert len(calls) == 1  # the same canonical step
    a, b = np.flatnonzero(~resident[0])[:2]
    counts = np.zeros(128, np.int64)
    counts[[a, b]] = 1
    staged_s = np.full(128, np.inf)
    staged_s[a] = 0.0
    memo(counts, 0, staged_s)
    staged_s[[a, b]] = [np.inf, 0.0]
    memo(counts, 0, staged_s)  # the landed copy is the other count-1 expert's: a relabeling of the same step
    assert len(calls) == 2
    staged_s[b] = 2.0 * MS
    plan = memo(counts, 0, staged_s)  # a later landing: another step
    assert len(calls) == 3 and plan.lanes[b] == planner(counts, resident[0], LAT, staged_s=staged_s).lanes[b]


# --- the Plan type, the registry, configs, bad input -------------------------------------------------------

def test_plan_is_small_arrays_and_prints_readably():
    plan = get_planner("fiddler_overlap")(np.array([0, 1, 300, 2]), np.array([False, True, False, False]), LAT)
    assert isinstance(plan, Plan)
    assert plan.lanes.dtype == np.int8 and plan.lanes.shape == (4,)
    assert plan.transfer_order.dtype == np.int32
    text = str(plan)
    assert text.startswith("fiddler_overlap") and "transfer 2:300" in text and "gpu 1:1" in text


def test_unknown_names_and_parameters():
    with pytest.raises(PlannerError) as e:
        get_planner("fidler")
    assert all(name in str(e.value) for name in PLANNER_NAMES)
    with pytest.raises(PlannerError, match="cpu_only.*staging_slots"):
        get_planner("cpu_only", staging_slots=2)
    with pytest.raises(PlannerError, match="cache_slots"):
        get_planner("lru", cache_slots=0)
    with pytest.raises(PlannerError, match="staging_slots"):
        get_planner("fiddler", staging_slots=0)(np.array([1]), none_resident(1), LAT)
    assert isinstance(e.value, InvalidInputError)
    assert set(PLANNER_NAMES) == set(POLICIES) | {"lru"}


@pytest.mark.parametrize("counts, resident", [(np.array([1, -1]), none_resident(2)),
                                              (np.array([1.5, 0]), none_resident(2)),
                                              (np.array([[1, 0]]), none_resident(2)),
                                              (np.array([1, 0]), np.zeros(3, bool))])
def test_bad_counts_are_refused(counts, resident):
    with pytest.raises(PlannerError):
        plan_fiddler(counts, resident, LAT)


def test_every_planner_yaml_composes_with_the_schema():
    from omegaconf import OmegaConf

    names = sorted(f[:-5] for f in os.listdir(CONF_DIR) if f.endswith(".yaml"))
    assert names == sorted(PLANNER_NAMES)
    for name in names:
        yaml = OmegaConf.load(os.path.join(CONF_DIR, f"{name}.yaml"))
        cfg = OmegaConf.merge(OmegaConf.structured(PlannerConfig), yaml)
        assert cfg.name == name
        planner = planner_from_config(cfg)
        counts, resident = np.array([1, 300, 0, 2]), np.array([True, False, False, False])
        if name == "gpu_only":
            resident[:] = True
        assert planner(counts, resident, LAT).lanes.shape == (4,)
    assert isinstance(planner_from_config(PlannerConfig()), type(get_planner("fiddler_overlap")))
