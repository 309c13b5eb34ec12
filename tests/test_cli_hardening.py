"""The command line under bad input, Ctrl-C and unwritable outputs: one ``error:`` line (status 2) or one
``interrupted`` line (status 130), never a traceback; no option silently ignored or misread; ``--help`` explains
every option; outputs go where the command says (``out=``, else ``fiddler-jax-outputs/<command>/<time>/``)."""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fiddler_jax as fj
from fiddler_jax.errors import InvalidInputError

PY = sys.executable


def cli(*args, cwd, timeout=300):
    cache = f"{cwd}-cache"  # beside the working folder: the tests below list what a command left in it
    env = dict(os.environ, JAX_PLATFORMS="cpu", XDG_CACHE_HOME=cache)
    return subprocess.run([PY, "-m", "fiddler_jax.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(r, message: str, status: int = 2) -> None:
    """The run failed with ``status`` and ended in exactly one ``error: ...`` line holding ``message``."""
    assert r.returncode == status, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr[-3000:]
    assert r.stderr.rstrip().splitlines()[-1] == errors[0], r.stderr[-3000:]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """(working folder, a small random model folder, a regular file to put outputs under)."""
    work = tmp_path_factory.mktemp("hardening")
    model = work / "model"
    r = cli("init-random", f"out={model}", "seed=1", "geometry.num_hidden_layers=2", "geometry.hidden_size=64",
            cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    blocker = work / "a-file"
    blocker.write_text("not a folder\n")
    return work, model, blocker


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A small text file to profile on (the default corpus takes longer to read and tokenise)."""
    path = tmp_path_factory.mktemp("text") / "doc.py"
    path.write_text(open(os.__file__, encoding="utf-8").read()[:20000])
    return path


# -- item 6: one error line ---------------------------------------------------------------------------------------

def test_init_random_without_out(tmp_path):
    one_error_line(cli("init-random", cwd=tmp_path), "init-random needs out=<folder>")
    assert os.listdir(tmp_path) == []  # nothing written either


@pytest.mark.parametrize("args, message", [
    (["--ns", "abc"], "argument --ns: 'abc' is not a comma list of positive token counts"),
    (["--ns", "1,0"], "argument --ns"),
    (["--hidden", "x"], "argument --hidden: 'x' is not an integer"),
    (["--budget", "-1"], "argument --budget: -1 must be a positive number"),
    (["--amx-sweep", "{"], "argument --amx-sweep: not JSON"),
    (["--json", "A_FILE/k.json"], "is a file, not a folder"),
])
def test_bench_kernel_bad_arguments(work, args, message):
    wd, _, blocker = work
    args = [a.replace("A_FILE", str(blocker)) for a in args]
    r = cli("bench-kernel", *args, cwd=wd, timeout=60)
    one_error_line(r, message)
    assert r.stderr.strip().count("\n") == 0  # no usage block either: the one line says where --help is


def test_ctrl_c_during_generate_is_one_line(tmp_path):
    """SIGINT once generation has started (a marker file written by each decode step's dispatch says so, and the
    step then lingers, as a long generation would, so the signal always lands mid-generation): `interrupted`,
    status 130, no traceback."""
    mark = tmp_path / "generating"
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import os, signal, sys, time\n"
        # as a foreground command has it: a suite run in the background of a non-interactive shell has SIGINT
        # ignored, which this child would inherit and so never see the signal
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import fiddler_jax.runtime.generate as g\n"
        "step = g.next_tokens\n"
        "def marked(*a, **k):\n"
        "    open(os.environ['MARK'], 'w').close()\n"
        "    time.sleep(0.5)\n"
        "    return step(*a, **k)\n"
        "g.next_tokens = marked\n"
        "from fiddler_jax.cli import main\n"
        "main(sys.argv[1:])\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", MARK=str(mark))
    p = subprocess.Popen([PY, str(driver), "generate", "max_new_tokens=1900"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not mark.exists():
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "generation did not start"
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, (p.returncode, err[-3000:])
    assert "Traceback" not in err and err.rstrip().splitlines()[-1] == "interrupted", err[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["driver.py", "generating"]  # and no run folder


def test_a_profile_that_is_a_json_list(work, tmp_path):
    from fiddler_jax.runtime.profiling import RoutingProfile

    wd, model, _ = work
    bad = tmp_path / "profile.json"
    bad.write_text("[1, 2, 3]")
    with pytest.raises(InvalidInputError, match="not a routing profile .it holds a JSON list, not an object"):
        RoutingProfile.load(bad)
    for text, kind in (('"x"', "string"), ("3", "number"), ("null", "null")):
        (tmp_path / "other.json").write_text(text)
        with pytest.raises(InvalidInputError, match=f"holds a JSON {kind}"):
            RoutingProfile.load(tmp_path / "other.json")
    one_error_line(cli("generate", f"model.path={model}", "prompt_ids=[1,2]", "max_new_tokens=2",
                       "engine.resident_experts=8", f"placement.profile={bad}", cwd=wd),
                   "holds a JSON list, not an object")
    one_error_line(cli("bench", f"placement.profile={bad}", "repeats=1", "warmup=0", "scenario.input_tokens=8",
                       "scenario.output_tokens=2", "hydra.run.dir=" + str(tmp_path / "run"), cwd=wd),
                   "holds a JSON list, not an object")


@pytest.mark.parametrize("args, what", [
    (["init-random", "out=A_FILE/sub"], "cannot write the model to A_FILE/sub"),
    (["profile", "out=A_FILE/sub/profile.json", "max_tokens=256", "seq_len=128"],
     "cannot write the profile to A_FILE/sub/profile.json"),
    (["calibrate", "out=A_FILE/latency.json", "ns=[1]", "experts=1", "budget_s=0.1"],
     "cannot write the latency model to A_FILE/latency.json"),
    (["generate", "model.path=MODEL", "prompt_ids=[1]", "max_new_tokens=2", "engine.resident_experts=8",
      "engine.trace=A_FILE/trace.json"], "cannot write engine.trace to A_FILE/trace.json"),
])
def test_an_output_path_that_cannot_be_written(work, args, what):
    """An output under a regular file (as root, chmod would not stop the write): refused before any work, naming
    the path and why."""
    wd, model, blocker = work
    args = [a.replace("A_FILE", str(blocker)).replace("MODEL", str(model)) for a in args]
    r = cli(*args, cwd=wd)
    one_error_line(r, what.replace("A_FILE", str(blocker)))
    assert f"{blocker} is a file, not a folder" in r.stderr
    assert "profiling routing" not in r.stderr and "calibrating" not in r.stdout  # refused before the work


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder(work, tmp_path):
    wd, _, _ = work
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        one_error_line(cli("init-random", f"out={ro / 'model'}", cwd=wd), f"folder {ro} is not writable")
        one_error_line(cli("profile", f"out={ro / 'p.json'}", cwd=wd), f"folder {ro} is not writable")
    finally:
        ro.chmod(0o700)


def test_output_checks_and_writes(tmp_path, monkeypatch):
    from fiddler_jax.experiments.common import check_output_path, write_output

    blocker = tmp_path / "f"
    blocker.write_text("x")
    assert check_output_path(tmp_path / "new" / "deeper" / "x.json", "it") == str(tmp_path / "new/deeper/x.json")
    assert not (tmp_path / "new").exists()  # checking makes nothing
    with pytest.raises(InvalidInputError, match="it is a folder; give a file path"):
        check_output_path(tmp_path, "the profile")
    with pytest.raises(InvalidInputError, match="exists and is not a folder"):
        check_output_path(blocker, "the model", folder=True)
    with pytest.raises(InvalidInputError, match=f"{blocker} is a file, not a folder"):
        check_output_path(blocker / "a" / "b", "the model", folder=True)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    with pytest.raises(InvalidInputError, match=f"folder {tmp_path} is not writable .Permission denied."):
        check_output_path(tmp_path / "x.json", "the profile")
    monkeypatch.undo()

    def read_only(path):
        raise OSError(30, "Read-only file system", path)

    with pytest.raises(InvalidInputError, match="cannot write the plot to .*: Read-only file system"):
        write_output(str(tmp_path / "sub" / "p.png"), "the plot", read_only)
    assert (tmp_path / "sub").is_dir()  # parent folders are made on the way


# -- item 7: nothing silently ignored or misread -----------------------------------------------------------------

def test_num_beams_zero_is_refused(work):
    wd, model, _ = work
    one_error_line(cli("generate", f"model.path={model}", "prompt_ids=[1]", "num_beams=0", cwd=wd),
                   "num_beams must be an integer ≥ 1, got 0")


@pytest.mark.parametrize("overrides", [
    ["planner=fiddler"], ["placement.profile=profile.json"], ["engine.latency=auto"], ["kernel=xla"],
    ["placement=first", "planner.staging_slots=4"], ["engine.max_batch=4"],
])
def test_engine_options_without_the_engine_are_refused(work, overrides):
    wd, model, _ = work
    r = cli("generate", f"model.path={model}", "prompt_ids=[1]", "max_new_tokens=2", *overrides, cwd=wd)
    one_error_line(r, f"{', '.join(overrides)} only appl")
    assert "set engine.gpu_budget (e.g. engine.gpu_budget=24GiB) or engine.resident_experts=<n>" in r.stderr


def test_decode_escapes():
    from fiddler_jax.experiments.common import decode_escapes

    assert decode_escapes(r"import os\n\tx = 1\\n \d") == "import os\n\tx = 1\\n \\d"


def test_prompt_escapes(tmp_path):
    """The README's 'prompt="import os\\n"' sends a newline (\\\\n would send a backslash and an n)."""
    r = cli("generate", r'prompt="import os\n"', "max_new_tokens=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("import os\n") and not r.stdout.startswith("import os\\n"), r.stdout[:200]


def test_bench_kernel_quick_lets_ns_win(tmp_path):
    """--quick no longer replaces an explicit --ns (or --budget, --experts); each stage says it is starting."""
    out = tmp_path / "k.json"
    r = cli("bench-kernel", "--quick", "--ns", "2,3", "--hidden", "64", "--ffn", "96", "--budget", "0.02",
            "--no-xla", "--no-torch", "--no-sweeps", "--experts", "2", "--json", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {row["n"] for row in json.loads(out.read_text())["rows"] if row["kind"] == "expert"} == {2, 3}
    lines = r.stdout.splitlines()
    first_row = next(i for i, line in enumerate(lines) if line.startswith("  expert"))
    assert any(line.startswith("-- making") for line in lines[:first_row]), r.stdout
    assert any(line.startswith("-- checking each path") for line in lines), r.stdout


def test_eos_token_id_outside_the_vocabulary_is_refused(work):
    _, model_dir, _ = work
    model = fj.load_pretrained(model_dir, progress=False)
    vocab = model.config.vocab_size
    ids = np.array([[1, 2]])
    for call in (lambda **k: fj.generate(model, ids, 2, **k),
                 lambda **k: fj.generate(model, ids, 2, num_beams=2, **k),
                 lambda **k: fj.generate_with_stats(model, ids, 2, **k)):
        with pytest.raises(InvalidInputError, match=f"eos_token_id {vocab} is outside the vocabulary"):
            call(eos_token_id=vocab)
        with pytest.raises(InvalidInputError, match="eos_token_id -1 is outside"):
            call(eos_token_id=[2, -1])
        with pytest.raises(InvalidInputError, match="eos_token_id must be a token id"):
            call(eos_token_id=1.5)
    assert fj.generate(model, ids, 2, eos_token_id=[vocab - 1]).shape[1] >= 3  # in the vocabulary: fine


# -- item 11: help and where outputs go -------------------------------------------------------------------------

def help_options(text: str) -> dict[str, str]:
    """{key: help} of the Options section of a command's --help."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Options ("))
    options: dict[str, str] = {}
    key = None
    for line in lines[start + 1:]:
        if not line.strip():
            break
        if line.startswith(" " * 42):  # the help text goes on
            options[key] = f"{options[key]} {line.strip()}".strip()
        else:  # "  key=value" padded to column 42 and the help, or alone on its line when long
            left, right = (line[:42], line[42:]) if len(line) > 42 and line[40:42] == "  " else (line, "")
            key = left.strip().split("=", 1)[0]
            options[key] = right.strip()
    return options


def leaves(node, prefix=""):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from leaves(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix


@pytest.mark.parametrize("command, config", [
    ("generate", "generate"), ("init-random", "init_random"), ("profile", "profile"), ("calibrate", "calibrate"),
    ("train-tiny", "train_tiny"), ("quant-accuracy", "quant_accuracy"),
])
def test_help_explains_every_option_and_only_its_groups(tmp_path, command, config):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fiddler_jax.experiments.common import CONF_DIR

    r = cli(command, "--help", cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.listdir(tmp_path) == []
    importlib.import_module(f"fiddler_jax.experiments.{config}")  # registers the config's schema
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name=config), resolve=False)
    options = help_options(r.stdout)
    assert set(leaves(cfg)) == set(options), r.stdout
    unexplained = [k for k, v in options.items() if not v]
    assert not unexplained, r.stdout
    groups = {line.split(":")[0].strip().lstrip("+") for line in r.stdout.split("Options (")[0].splitlines()
              if line.startswith("  ") and not line.startswith("    ") and ":" in line}
    expected = {"generate": {"model", "placement", "planner", "kernel"}, "train-tiny": {"train"},
                "quant-accuracy": {"model"}}
    assert groups == expected.get(command, set()), r.stdout


def test_generate_help_marks_the_chosen_options(tmp_path):
    r = cli("generate", "planner=lru", "--help", cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "    * lru" in r.stdout and "      fiddler_overlap" in r.stdout
    assert "planner.cache_slots=2" in r.stdout
    for rejected in ("hardware", "scenario", "experiment"):
        assert f"  {rejected}:" not in r.stdout and f"+{rejected}:" not in r.stdout


def test_commands_write_only_where_they_say(work, text, tmp_path):
    """generate and init-random leave no run folder; profile writes out= only, or without it
    fiddler-jax-outputs/profile/<time>/profile.json, and says where."""
    _, model, _ = work
    r = cli("generate", f"model.path={model}", "prompt_ids=[1]", "max_new_tokens=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("init-random", "out=m", "geometry.num_hidden_layers=1", "geometry.hidden_size=32", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.listdir(tmp_path) == ["m"]
    r = cli("profile", "out=p.json", f"data={text}", "max_tokens=256", "seq_len=128", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["m", "p.json"]
    r = cli("profile", f"data={text}", "max_tokens=256", "seq_len=128", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = os.listdir(tmp_path / "fiddler-jax-outputs" / "profile")
    assert len(runs) == 1 and os.listdir(tmp_path / "fiddler-jax-outputs" / "profile" / runs[0]) == ["profile.json"]
    assert f"wrote {tmp_path / 'fiddler-jax-outputs' / 'profile' / runs[0] / 'profile.json'}" in r.stdout


def test_calibrate_with_out_writes_beside_it_only(tmp_path):
    r = cli("calibrate", "out=lat/model.json", "ns=[1,4]", "experts=1", "budget_s=0.2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.listdir(tmp_path) == ["lat"]
    assert sorted(os.listdir(tmp_path / "lat")) == ["model.json", "model.measurements.json", "model.png"]
    for name in ("model.json", "model.measurements.json", "model.png"):
        assert f"wrote {tmp_path / 'lat' / name}" in r.stdout


def test_max_new_tokens_beyond_the_context_is_refused_before_loading(work):
    wd, model, _ = work
    r = cli("generate", f"model.path={model}", "prompt_ids=[1,2,3]", "max_new_tokens=100000", cwd=wd)
    one_error_line(r, "max_new_tokens=100000 after a prompt of 3 token(s) goes beyond the model's")
    assert "loading" not in r.stderr  # refused before any weight was read
