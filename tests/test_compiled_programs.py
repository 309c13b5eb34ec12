"""Compiled XLA programs hold memory mappings until released; the commands release them after each job, so a
process running many jobs stays far from the kernel's cap on mappings."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiddler_jax.experiments.common import clear_errors
from fiddler_jax.runtime.compiled_programs import mapping_count, mapping_limit, release_compiled_programs

PROGRAMS = 40

pytestmark = pytest.mark.skipif(mapping_count() is None, reason="needs /proc/self/maps (Linux)")


def compile_programs(tag: int) -> None:
    """``PROGRAMS`` distinct programs, each compiled and run (a new shape is a new program)."""
    for n in range(1, PROGRAMS + 1):
        jax.jit(lambda x: jnp.sin(x) * tag + n)(jnp.ones(n + 1000 * tag)).block_until_ready()


@pytest.fixture(autouse=True)
def started_backend():
    """JAX's CPU client started before counting (its threads and arenas are mappings of their own)."""
    jax.jit(jnp.sin)(jnp.ones(3)).block_until_ready()


def test_release_unmaps_the_programs_nothing_references():
    release_compiled_programs()
    start = mapping_count()
    compile_programs(1)
    grown = mapping_count()
    assert grown - start >= PROGRAMS, (start, grown)  # at least a mapping a program: the growth is real
    release_compiled_programs()
    assert mapping_count() - start < PROGRAMS // 4, (start, grown, mapping_count())


def test_a_command_task_releases_its_programs_when_it_ends():
    release_compiled_programs()
    start = mapping_count()
    clear_errors(compile_programs)(2)
    assert mapping_count() - start < PROGRAMS // 4, (start, mapping_count())


def test_a_failing_command_task_also_releases_them(capsys):
    from fiddler_jax.errors import InvalidInputError

    def task():
        compile_programs(3)
        raise InvalidInputError("bad option")

    release_compiled_programs()
    start = mapping_count()
    with pytest.raises(SystemExit):
        clear_errors(task)()
    assert "error: bad option" in capsys.readouterr().err
    assert mapping_count() - start < PROGRAMS // 4, (start, mapping_count())


def test_the_limit_is_read_where_the_kernel_has_one():
    limit = mapping_limit()
    assert limit is None or limit > mapping_count()


@pytest.mark.parametrize("near", [False, True])
def test_an_engine_build_makes_room_only_near_the_limit(monkeypatch, near):
    """Past half the cap an engine build releases the compiled programs before it compiles its own (a notebook
    building engine after engine never crashes); below it, it keeps them."""
    from fiddler_jax.assets import default_model_path
    from fiddler_jax.runtime import compiled_programs
    from fiddler_jax.runtime.engine import Engine

    released = []
    real_count = compiled_programs.mapping_count
    monkeypatch.setattr(compiled_programs, "mapping_limit", (lambda: real_count() + 100) if near
                        else lambda: 10**9)
    monkeypatch.setattr(compiled_programs, "release_compiled_programs", lambda: released.append(real_count()))
    engine = Engine.from_pretrained(default_model_path(), gpu_budget=10**9, planner="cpu_only",
                                    resident_experts=4, dtype="float32", progress=False, latency=None)
    assert len(released) == (1 if near else 0)
    assert engine.generate(np.array([[1, 5, 9]]), 2, eos_token_id=[]).shape == (1, 5)


def test_a_process_without_jax_releases_without_loading_it():
    """The commands release after every task; one that never loaded JAX (report, bench-kernel) must not pay for
    importing it."""
    import subprocess
    import sys

    code = ("import sys\nfrom fiddler_jax.runtime.compiled_programs import release_compiled_programs\n"
            "release_compiled_programs()\nassert 'jax' not in sys.modules, 'jax was imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
