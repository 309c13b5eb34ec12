"""Streamed-step qualification by symmetry classes: one representative per class decides what full enumeration of
the count vectors decides, for every planner of the registry, and a 128-expert top-8 decode step qualifies
at once."""
from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np
import pytest

from fiddler_jax.runtime import planning as P
from fiddler_jax.runtime.latency import LatencyModel, PiecewiseLinear
from fiddler_jax.runtime.planning.streamed_steps import (
    all_cpu_for_any_routing, class_representatives, count_vectors, plan_is_all_cpu, routing_class,
)

MS = 1e-3
DESIGN = LatencyModel.from_design_numbers()
U = 1 / 1024  # a unit in which these latencies and their differences are exact floats
LATENCIES = {
    "design": DESIGN,  # one copy 6.4 ms, one CPU token 3.5 ms: several offloaded experts are worth a copy
    "slow_copies": dataclasses.replace(DESIGN, transfer_s=0.1),  # the CPU always wins
    "fast_copies": dataclasses.replace(DESIGN, transfer_s=0.5 * MS),  # copying always wins
    # exactly equal savings at counts 1 and 2 but different GPU and CPU times: ties between experts that the
    # class does not tell apart
    "tied_savings": dataclasses.replace(DESIGN, cpu=PiecewiseLinear((1, 2, 3), (11 * U, 16 * U, 21 * U)),
                                        gpu=PiecewiseLinear((1, 2, 3), (0.0, 5 * U, 24 * U)), transfer_s=10 * U),
    # Qwen3-30B-A3B's expert as calibrated on the H100 machine: one copy is worth it beside 8 offloaded experts
    # on the CPU, by less than the sync it costs
    "h100_qwen3": dataclasses.replace(DESIGN, cpu=PiecewiseLinear((1, 8), (0.101 * MS, 0.193 * MS)),
                                      gpu=PiecewiseLinear((1, 8), (0.059 * MS, 0.06 * MS)), transfer_s=0.46 * MS,
                                      sync_s=0.239 * MS),
}
PLANNERS = [
    ("fiddler", {}), ("fiddler", {"concurrent": True}), ("fiddler", {"concurrent": True, "max_transfers": 1}),
    ("fiddler_overlap", {}), ("fiddler_overlap", {"staging_slots": 1}),
    ("fiddler_overlap", {"exact_limit": 0, "max_transfers": 1}),  # the prefix search with Algorithm 1's row
    ("cpu_only", {}), ("transfer", {}), ("gpu_only", {}), ("lru", {}),
]
# (experts, top_k, tokens) small enough to enumerate every count vector
GEOMETRIES = [(e, k, t) for e, k, t in itertools.product((4, 6, 8), (1, 2, 3), (1, 2, 3))
              if sum(1 for _ in count_vectors(e, t, k)) <= 300]


def masks(experts, rng, n=3):
    """No expert resident, and ``n`` random residency masks."""
    return [np.zeros(experts, bool)] + [rng.random(experts) < rng.uniform(0.2, 0.7) for _ in range(n)]


def outcome(plan_of, counts, resident):
    """plan_is_all_cpu, or "refused" where the planner raises (gpu_only with an offloaded expert chosen)."""
    try:
        return plan_is_all_cpu(plan_of(counts), counts, resident)
    except P.PlannerError:
        return "refused"


@pytest.mark.parametrize("experts,top_k,tokens", GEOMETRIES)
def test_representatives_are_one_valid_vector_per_class(experts, top_k, tokens):
    rng = np.random.default_rng(experts * 100 + top_k * 10 + tokens)
    for resident in masks(experts, rng) + [np.ones(experts, bool)]:
        reps = list(class_representatives(resident, tokens, top_k))
        keys = [routing_class(c, resident) for c in reps]
        assert len(set(keys)) == len(keys)
        assert set(keys) == {routing_class(c, resident) for c in count_vectors(experts, tokens, top_k)}
        for c in reps:
            assert c.sum() == tokens * top_k and c.min() >= 0 and c.max() <= tokens
        if tokens == 1:
            assert len(reps) <= top_k + 1


@pytest.mark.parametrize("streamable", [False, True], ids=["synced", "streamable"])
@pytest.mark.parametrize("name,params", PLANNERS, ids=[f"{n}{p}" for n, p in PLANNERS])
def test_class_qualification_equals_full_enumeration(name, params, streamable):
    """Every count vector's all-CPU verdict is its class representative's, so the qualification on classes is
    the qualification on every vector -- asked as the streamed lane asks (streamable) and as a synced step
    plans."""
    planner = P.get_planner(name, **params)
    rng = np.random.default_rng(len(name) + len(params))
    for (experts, top_k, tokens), latency in itertools.product(GEOMETRIES, LATENCIES.values()):
        for resident in masks(experts, rng, n=2):
            plan_of = lambda c: planner(c, resident, latency, streamable=streamable)  # noqa: E731
            verdict = {routing_class(c, resident): outcome(plan_of, c, resident)
                       for c in class_representatives(resident, tokens, top_k)}
            every = [outcome(plan_of, c, resident) for c in count_vectors(experts, tokens, top_k)]
            for c, got in zip(count_vectors(experts, tokens, top_k), every):
                assert got == verdict[routing_class(c, resident)], (experts, top_k, tokens, resident, c, latency)
            if "refused" not in every:
                assert all_cpu_for_any_routing(plan_of, resident, tokens, top_k) == all(every)


def test_qualification_through_the_memo_equals_full_enumeration():
    """The engine asks through its memo (canonical plans relabeled back): the same verdicts."""
    rng = np.random.default_rng(7)
    resident = rng.random((3, 8)) < 0.4
    for name, latency in itertools.product(("fiddler_overlap", "cpu_only"), LATENCIES.values()):
        memo = P.PlanMemo(P.get_planner(name), resident, latency)
        direct = P.get_planner(name)
        for layer, tokens in itertools.product(range(3), (1, 2)):
            got = all_cpu_for_any_routing(lambda c: memo(c, layer), resident[layer], tokens, 2)
            assert got == all(plan_is_all_cpu(direct(c, resident[layer], latency), c, resident[layer])
                              for c in count_vectors(8, tokens, 2))


def test_a_streamable_step_copies_only_what_saves_more_than_the_sync():
    """On the H100 machine's Qwen3 numbers one copy beside 8 offloaded one-token experts saves 0.1 ms of the
    CPU's 0.81: a synced step takes it; a streamable one stays all-CPU (the copy would bring back the 0.24 ms
    sync), so every decode class qualifies and the layer streams. The prediction drops the sync only there."""
    latency = LATENCIES["h100_qwen3"]
    resident = np.zeros(128, bool)
    resident[:24] = True
    counts = np.zeros(128, np.int64)
    counts[24:32] = 1
    planner = P.get_planner("fiddler_overlap")
    synced, streamed = planner(counts, resident, latency), planner(counts, resident, latency, streamable=True)
    assert len(synced.transfer_order) == 1 and not plan_is_all_cpu(synced, counts, resident)
    assert plan_is_all_cpu(streamed, counts, resident)
    assert streamed.predicted_s == pytest.approx(8 * 0.101 * MS)
    assert synced.predicted_s == pytest.approx(latency.sync_s + 7 * 0.101 * MS)
    assert not all_cpu_for_any_routing(lambda c: planner(c, resident, latency), resident, 1, 8)
    assert all_cpu_for_any_routing(lambda c: planner(c, resident, latency, streamable=True), resident, 1, 8)
    memo = P.PlanMemo(planner, resident[None], latency)  # keyed apart: the same counts, both answers
    assert len(memo(counts, 0).transfer_order) == 1 and not len(memo(counts, 0, streamable=True).transfer_order)
    # where copying saves more than the sync, a streamable step copies too
    fast = dataclasses.replace(latency, transfer_s=0.02 * MS)  # 5 copies: 0.55 ms with the sync, against 0.81
    wide = P.get_planner("fiddler_overlap", staging_slots=8)
    assert len(wide(counts, resident, fast, streamable=True).transfer_order) == 5


def test_every_planner_that_can_stream_predicts_a_streamed_step_without_the_sync():
    """cpu_only and fiddler's concurrent ablation choose the same lanes on a streamable step; only the prediction
    of a plan that copies nothing drops ``sync_s`` (it runs on the streamed lane), so the trace of a streamed
    step compares its span with what it costs. A sequential plan never streams and a plan that copies keeps the
    sync."""
    latency = LATENCIES["h100_qwen3"]
    resident = np.zeros(128, bool)
    resident[:24] = True
    counts = np.zeros(128, np.int64)
    counts[24:32] = 1
    for name, params, streams in (("cpu_only", {}, True), ("fiddler", {"concurrent": True}, True),
                                  ("fiddler", {}, False)):
        planner = P.get_planner(name, **params)
        synced, streamed = planner(counts, resident, latency), planner(counts, resident, latency, streamable=True)
        assert np.array_equal(synced.lanes, streamed.lanes) and plan_is_all_cpu(streamed, counts, resident) == streams
        assert streamed.predicted_s == pytest.approx((0 if streams else latency.sync_s) + 8 * 0.101 * MS), name
        assert synced.predicted_s == pytest.approx(latency.sync_s + 8 * 0.101 * MS), name
    fast = dataclasses.replace(latency, transfer_s=0.0)  # Algorithm 1 copies every offloaded expert now
    copying = P.get_planner("fiddler", staging_slots=8, concurrent=True)(counts, resident, fast, streamable=True)
    assert len(copying.transfer_order) == 8 and copying.predicted_s >= latency.sync_s


def test_algorithm_1_ties_follow_copy_order_so_a_class_has_one_verdict():
    """Two members of one class (the offloaded counts 1 and 2 trade experts) with exactly equal savings: were
    Algorithm 1's ties broken by expert id, its extra candidate in the prefix search would copy the count-1
    expert for one member (23.7 ms, not all-CPU) and the count-2 expert for the other (all-CPU stays best).
    Ties go to the earlier expert in copy order, so both members get the same plan, relabeled."""
    latency = LATENCIES["tied_savings"]
    resident = np.array([True, False, False, False])
    planner = P.get_planner("fiddler_overlap", exact_limit=0, max_transfers=1)
    a, b = np.array([3, 1, 2, 0]), np.array([3, 2, 1, 0])
    plan_a, plan_b = planner(a, resident, latency), planner(b, resident, latency)
    assert plan_is_all_cpu(plan_a, a, resident) == plan_is_all_cpu(plan_b, b, resident)
    np.testing.assert_array_equal(plan_a.lanes[[0, 1, 2, 3]], plan_b.lanes[[0, 2, 1, 3]])
    assert plan_a.predicted_s == plan_b.predicted_s


@pytest.mark.parametrize("name", ["cpu_only", "fiddler_overlap", "fiddler"])
def test_a_128_expert_top_8_decode_step_qualifies_at_once(name):
    """C(128, 8) ≈ 1.4e12 count vectors, 9 classes: where the CPU wins, the step streams; where copying wins
    (fast copies; for fiddler_overlap the design numbers too: 8 offloaded experts are worth copies beside the
    CPU) it does not."""
    rng = np.random.default_rng(0)
    resident = np.zeros(128, bool)
    resident[rng.choice(128, 40, replace=False)] = True
    planner = P.get_planner(name, **({"concurrent": True} if name == "fiddler" else {}))
    slow = LATENCIES["slow_copies"]
    memo = P.PlanMemo(planner, resident[None], slow)
    start = time.perf_counter()
    assert len(list(class_representatives(resident, 1, 8))) == 9
    assert all_cpu_for_any_routing(lambda c: planner(c, resident, slow), resident, 1, 8)
    assert all_cpu_for_any_routing(lambda c: memo(c, 0), resident, 1, 8)
    assert time.perf_counter() - start < 1.0
    if name != "cpu_only":
        fast = LATENCIES["fast_copies"]
        assert not all_cpu_for_any_routing(lambda c: planner(c, resident, fast), resident, 1, 8)
    if name == "fiddler_overlap":
        assert not all_cpu_for_any_routing(lambda c: planner(c, resident, DESIGN), resident, 1, 8)


def test_steps_with_too_many_classes_are_refused_quickly():
    resident = np.zeros(128, bool)
    resident[:40] = True
    plan_of = lambda c: P.plan_cpu_only(c, resident, DESIGN)  # noqa: E731
    start = time.perf_counter()
    assert all_cpu_for_any_routing(plan_of, resident, 2, 8)  # 2 tokens: a few hundred classes
    assert not all_cpu_for_any_routing(plan_of, resident, 64, 8)  # prefill: far beyond the limit
    assert not all_cpu_for_any_routing(plan_of, resident, 2, 8, limit=10)
    assert time.perf_counter() - start < 2.0
    assert not all_cpu_for_any_routing(plan_of, resident, 1, 200)  # top_k beyond the experts: no such step


def _random_latency(rng) -> LatencyModel:
    """A latency model with random increasing CPU and GPU curves, copy (alone and beside CPU work, either one the
    faster) and sync times (milliseconds apart)."""
    knots = (1, 2, 4, 8)
    cpu = np.cumsum(rng.uniform(0.05, 2.0, 4)) * MS
    gpu = np.cumsum(rng.uniform(0.0, 0.3, 4)) * MS
    return dataclasses.replace(DESIGN, cpu=PiecewiseLinear(knots, tuple(cpu)), gpu=PiecewiseLinear(knots, tuple(gpu)),
                               transfer_s=rng.uniform(0.1, 12.0) * MS, transfer_busy_s=rng.uniform(0.1, 24.0) * MS,
                               sync_s=rng.uniform(0.0, 1.0) * MS)


@pytest.mark.parametrize("experts,top_k,tokens", [(6, 2, 1), (6, 2, 2), (8, 2, 3), (8, 3, 2), (6, 1, 3)])
def test_the_bound_proves_only_what_every_class_confirms(experts, top_k, tokens):
    """all_cpu_by_bound is sound: wherever it proves a step all-CPU (streamable), every count vector's plan is
    all-CPU (symmetry classes, which equal full enumeration), over random latency models and residencies; and it
    proves something for every planner that can stream."""
    from fiddler_jax.runtime.planning.streamed_steps import all_cpu_by_bound

    rng = np.random.default_rng(experts * 100 + top_k * 10 + tokens)
    proved = {}
    for trial in range(40):
        latency = _random_latency(rng)
        for resident in masks(experts, rng, n=2):
            for name, params in PLANNERS:
                planner = P.get_planner(name, **params)
                if not all_cpu_by_bound(planner, latency, resident, tokens, top_k):
                    continue
                proved[name] = proved.get(name, 0) + 1
                assert all_cpu_for_any_routing(lambda c: planner(c, resident, latency, streamable=True), resident,
                                               tokens, top_k, limit=10**6), (name, params, trial)
    assert {"cpu_only", "fiddler", "fiddler_overlap"} <= set(proved), proved


def test_the_bound_streams_steps_of_many_tokens_beyond_the_class_limit():
    """A 4- and a 16-token step of a 128-expert top-8 layer has more than DEFAULT_LIMIT classes: cpu_only is
    proved all-CPU for any count; fiddler_overlap on the H100 Qwen3 numbers is not (two 4-token experts save more
    CPU time than the sync, behind 2.7 ms of other CPU work: a copy pays), but with copies 10 x slower it is."""
    from fiddler_jax.runtime.planning.streamed_steps import all_cpu_by_bound

    latency = LATENCIES["h100_qwen3"]
    resident = np.zeros(128, bool)
    resident[:27] = True
    for tokens in (4, 16):
        assert not all_cpu_for_any_routing(lambda c: c, resident, tokens, 8)  # refused by the class limit
        assert all_cpu_by_bound(P.get_planner("cpu_only"), latency, resident, tokens, 8)
    assert not all_cpu_by_bound(P.get_planner("fiddler_overlap"), latency, resident, 4, 8)
    slow = dataclasses.replace(latency, transfer_s=4.6 * MS)
    assert all_cpu_by_bound(P.get_planner("fiddler_overlap"), slow, resident, 4, 8)
    assert not all_cpu_by_bound(P.get_planner("fiddler"), latency, resident, 4, 8)  # sequential: never streams
    assert all_cpu_by_bound(P.get_planner("fiddler", concurrent=True), latency, resident, 4, 8)
