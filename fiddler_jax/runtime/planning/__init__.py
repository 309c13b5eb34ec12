"""Planning a layer step, outside jit and without JAX: the ``Plan`` (:mod:`.plan`), its cost model
(:mod:`.cost`), the policies (:mod:`.policies`), planners by name (:mod:`.registry`), prefetch
(:mod:`.prefetch`), the dynamic cache's rule (:mod:`.cache_policy`), the plan memo (:mod:`.memo`) and which steps
need no plan at run time (:mod:`.streamed_steps`)."""
from fiddler_jax.runtime.planning.cache_policy import CacheState, CacheStates, plan_with_cache
from fiddler_jax.runtime.planning.memo import PlanMemo
from fiddler_jax.runtime.planning.plan import Lane, Plan, PlannerError
from fiddler_jax.runtime.planning.policies import (
    DEFAULT_STAGING_SLOTS, EXACT_LIMIT, POLICIES, plan_cpu_only, plan_fiddler, plan_fiddler_overlap, plan_gpu_only,
    plan_transfer,
)
from fiddler_jax.runtime.planning.prefetch import DEFAULT_PREFETCH, plan_prefetch
from fiddler_jax.runtime.planning.registry import DEFAULT_LRU_CACHE_SLOTS, PLANNER_NAMES, BoundPlanner, get_planner

__all__ = [
    "BoundPlanner", "CacheState", "CacheStates", "DEFAULT_LRU_CACHE_SLOTS", "DEFAULT_PREFETCH", "DEFAULT_STAGING_SLOTS",
    "EXACT_LIMIT", "Lane", "PLANNER_NAMES", "POLICIES", "Plan", "PlanMemo", "PlannerError", "get_planner",
    "plan_cpu_only", "plan_fiddler", "plan_fiddler_overlap", "plan_gpu_only", "plan_prefetch", "plan_transfer",
    "plan_with_cache",
]
