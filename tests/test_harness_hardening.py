"""The benchmark harness on hostile or unlucky input (issue 17): a result set never mixes runs (bench-jobs refuses
a used --out unless told to replace its own previous run, and `report` lists only what this run's manifest lists,
saying which jobs failed or are missing); jobs-file and result-file mistakes are one `error:` line naming the
file, the job and the override; every scenario's defaults fit the default model; `ceilings` shows progress; the
hf_accelerate baseline names the extra that installs it."""
from __future__ import annotations

import json
import os
import sys

import pytest
from hydra import compose, initialize_config_dir

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.experiments import bench, bench_jobs, report
from fiddler_jax.experiments.common import CONF_DIR
from tests.test_cli import cli


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("bench", overrides=list(overrides))


def _one_error_line(r, *fragments):
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


# --- item 3: a result set never mixes runs ---------------------------------------------------------------------

@pytest.fixture
def fake_bench(monkeypatch):
    """bench-jobs with a stand-in for the engine run: each job writes a small result.json (tokens/s = 10 × its
    number in `seed=N`), `planner=fiddler` fails the way an over-budget job does (result.json, then an error), and
    `planner=gpu_only` stops the whole process (Ctrl-C) mid-run."""
    from fiddler_jax.runtime.gpu_memory import BudgetExceededError

    def run_bench(cfg, out_dir, job_overrides=None):
        if cfg.planner.name == "gpu_only":
            raise KeyboardInterrupt
        rate = 10.0 * (cfg.seed + 1)
        result = {"metrics": {"tokens_per_s": {"median": rate, "min": rate, "max": rate, "runs": [rate]}},
                  "config": {"planner": {"name": cfg.planner.name}}, "overrides": list(job_overrides or []),
                  "git_sha": "0" * 40, "git_dirty": False, "hardware": {"gpu": "test"}}
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)
        if cfg.planner.name == "fiddler":
            raise BudgetExceededError("the run exceeded the 1.0 GiB budget by 1.0 MiB")
        return result

    monkeypatch.setattr(bench, "run_bench", run_bench)
    monkeypatch.setattr(bench, "table", lambda result: "table")


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def test_bench_jobs_refuses_a_used_out_and_replace_clears_only_its_own_run(tmp_path, fake_bench, capsys):
    out = tmp_path / "out"
    first = bench_jobs.run_jobs(["repeats=1"], [["planner=cpu_only", "seed=1"], ["planner=transfer", "seed=2"]],
                                str(out), jobs_file="first.yaml")
    assert [s for _, s in first] == ["ok", "ok"]
    manifest = _manifest(out)
    assert [(j["folder"], j["status"]) for j in manifest["jobs"]] == [("00_cpu_only_1", "ok"),
                                                                       ("01_transfer_2", "ok")]
    assert manifest["git_sha"] and manifest["started"] and manifest["finished"] and manifest["common"] == ["repeats=1"]
    assert manifest["jobs"][1]["overrides"] == ["planner=transfer", "seed=2"]
    report.report(str(out))  # its files are recorded as this run's, for --replace
    assert "report.md" in _manifest(out)["report_files"]

    (out / "notes.txt").write_text("mine")  # the user's own files are never removed
    (out / "mine").mkdir()
    second = [["planner=fiddler", "seed=1"], ["planner=lru", "seed=4"]]
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(InvalidInputError, match=r"is not empty.*--replace"):
        bench_jobs.run_jobs(["repeats=1"], second, str(out))
    assert sorted(p.name for p in out.iterdir()) == before  # refused before touching anything

    status = bench_jobs.run_jobs(["repeats=1"], second, str(out), replace=True)
    assert status[0][1].startswith("BudgetExceededError") and status[1][1] == "ok"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00_fiddler_1", "01_lru_4", "manifest.json", "mine", "notes.txt"], names
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "00_fiddler_1").iterdir()) == ["error.txt", "result.json"]
    manifest = _manifest(out)
    assert [(j["folder"], j["status"]) for j in manifest["jobs"]] == [("00_fiddler_1", "failed"),
                                                                       ("01_lru_4", "ok")]
    assert "exceeded the 1.0 GiB budget" in manifest["jobs"][0]["error"]

    table = report.report(str(out))
    assert "lru" in table and "fiddler" not in table.split("\n", 2)[2]  # the failed job's numbers are not listed
    assert "cpu_only" not in table and "transfer" not in table  # nothing of the first run
    assert table.startswith("| planner | seed |")  # what the jobs file varied, the failed job's overrides too
    md = (out / "report.md").read_text()
    assert "00_fiddler_1: failed: BudgetExceededError" in md and "01_lru_4: ok" in md
    assert "1 of 2 jobs ok" in md
    rows = (out / "report.csv").read_text().splitlines()
    assert len(rows) == 2 and "01_lru_4" in rows[1]


def test_replace_needs_a_manifest_and_never_leaves_the_folder(tmp_path, fake_bench):
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").write_text("{}")  # not written by bench-jobs (or by one older than manifests)
    with pytest.raises(InvalidInputError, match="no manifest.json"):
        bench_jobs.run_jobs([], [["planner=cpu_only"]], str(out), replace=True)
    assert (out / "result.json").exists()

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("x")
    (out / "result.json").unlink()
    (out / "manifest.json").write_text(json.dumps({
        "tool": "fiddler-jax bench-jobs", "format": 1, "jobs": [{"folder": "../victim", "status": "ok"}]}))
    with pytest.raises(InvalidInputError, match="not a plain name inside"):
        bench_jobs.run_jobs([], [["planner=cpu_only"]], str(out), replace=True)
    with pytest.raises(InvalidInputError, match="not a plain name inside"):
        report.report(str(out))
    assert (victim / "keep.txt").exists()

    (out / "manifest.json").write_text(json.dumps({"tool": "fiddler-jax bench-jobs", "format": 1, "jobs": []}))
    (out / "00_cpu_only").mkdir()  # the user's folder, under the name a new job would write
    with pytest.raises(InvalidInputError, match="00_cpu_only"):
        bench_jobs.run_jobs([], [["planner=cpu_only"]], str(out), replace=True)
    assert (out / "00_cpu_only").is_dir() and (out / "manifest.json").exists()

    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInputError, match="not a folder"):
        bench_jobs.run_jobs([], [["planner=cpu_only"]], str(tmp_path / "file"))


def test_report_lists_jobs_that_did_not_finish(tmp_path, fake_bench):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        bench_jobs.run_jobs([], [["planner=cpu_only"], ["planner=gpu_only"], ["planner=transfer"]], str(out))
    manifest = _manifest(out)
    assert [j["status"] for j in manifest["jobs"]] == ["ok", "running", "pending"] and manifest["finished"] is None
    (out / "01_gpu_only" / "result.json").write_text("{}")  # not this run's: never read
    report.report(str(out))
    md = (out / "report.md").read_text()
    assert "01_gpu_only: missing" in md and "02_transfer: missing" in md and "00_cpu_only: ok" in md


def test_report_cli_says_which_jobs_failed(tmp_path, fake_bench):
    out = tmp_path / "out"
    bench_jobs.run_jobs([], [["planner=fiddler"], ["planner=cpu_only"]], str(out))
    r = cli("report", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "00_fiddler: failed: BudgetExceededError" in r.stdout and "01_cpu_only: ok" in r.stdout
    assert "1 of 2 jobs ok, 1 failed" in r.stdout


def test_hydra_multirun_report_names_runs_without_a_result(tmp_path):
    """A sweep whose first job fails stops there: report names that job and the ones never started."""
    sweep = tmp_path / "sweep"
    r = cli("bench", "-m", "repeats=0,1,0", "planner=cpu_only", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert r.returncode == 2 and (sweep / "multirun.yaml").exists(), r.stderr[-2000:]
    assert not (sweep / "1").exists()  # the sweep stopped at job 0
    (sweep / "1").mkdir()  # a result for job 1 (as if it ran), so there is something to table
    rate = {"median": 1.0, "min": 1.0, "max": 1.0}
    (sweep / "1" / "result.json").write_text(json.dumps({"metrics": {"tokens_per_s": rate},
                                                         "overrides": ["repeats=1", "planner=cpu_only"]}))
    report.report(str(sweep))
    md = (sweep / "report.md").read_text()
    assert "2 of the sweep's 3 runs have no result.json" in md
    assert "- 0: failed (repeats=0 planner=cpu_only): InvalidInputError: scenario.input_tokens" in md  # error.txt
    assert "- 1: ok" in md and "- 2: missing: never started (repeats=0 planner=cpu_only)" in md


# --- item 6 (the harness's part): one `error:` line -------------------------------------------------------------

def test_a_jobs_file_with_an_override_typo_names_the_job_and_the_override(tmp_path):
    jobs = tmp_path / "typo.yaml"
    jobs.write_text("common: [repeats=1]\njobs:\n  - [planner=cpu_only]\n"
                    "  - [planner=cpu_only, scenario.input_tokns=3]\n")
    r = cli("bench-jobs", str(jobs), "--out", str(tmp_path / "out"), cwd=tmp_path)
    _one_error_line(r, str(jobs), "job 2 of 2", "'scenario.input_tokns=3'", "Key 'input_tokns' not in")
    assert not (tmp_path / "out").exists()
    common, job_list = bench_jobs.load_jobs(str(jobs))
    with pytest.raises(InvalidInputError, match=r"common override 'planner=fidler'.*available options in "
                                                r"'planner': cpu_only, fiddler"):
        bench_jobs.run_jobs(["planner=fidler"], job_list, str(tmp_path / "out"))
    with pytest.raises(InvalidInputError, match=r"job 1 of 2 \(\[repeats=abc\]\): override 'repeats=abc'.*"
                                                r"could not be converted to Integer"):
        bench_jobs.run_jobs(common, [["repeats=abc"], ["planner=x"]], str(tmp_path / "out"))
    with pytest.raises(InvalidInputError, match=r"and 1 more job"):
        bench_jobs.run_jobs(common, [["repeats=abc"], ["planner=x"]], str(tmp_path / "out"))


@pytest.mark.parametrize("text,problem", [
    ("jobs: [\n  - a\n", "expected the node content, but found '-' (line 2, column 3)"),
    ("jobs: []\njobs: [[a=1]]\n", "found duplicate key jobs (line 2, column 1)"),
    ("jobs:\n\t- [a=1]\n", "cannot start any token (line 2, column 1)"),
])
def test_malformed_jobs_yaml_names_the_file_and_the_problem(tmp_path, text, problem):
    jobs = tmp_path / "bad.yaml"
    jobs.write_text(text)
    with pytest.raises(InvalidInputError) as info:
        bench_jobs.load_jobs(str(jobs))
    message = str(info.value)
    assert str(jobs) in message and "not valid YAML" in message and problem in message and "\n" not in message


def test_malformed_jobs_yaml_and_bad_result_files_are_one_line_on_the_command_line(tmp_path):
    jobs = tmp_path / "bad.yaml"
    jobs.write_text("jobs: [\n  - a\n")
    r = cli("bench-jobs", str(jobs), "--out", str(tmp_path / "out"), cwd=tmp_path)
    _one_error_line(r, str(jobs), "not valid YAML", "line 2, column 3")
    (tmp_path / "bytes.yaml").write_bytes(b"\xff\xfejobs")
    r = cli("bench-jobs", str(tmp_path / "bytes.yaml"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    _one_error_line(r, "bytes.yaml", "UTF-8")
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "result.json").write_text("[1, 2]")
    r = cli("report", str(tmp_path / "runs"), cwd=tmp_path)
    _one_error_line(r, str(run / "result.json"), "not a bench result", "a JSON list")


@pytest.mark.parametrize("result,problem", [
    ([1, 2], "expected a JSON object with `metrics`, got a JSON list"),
    ({"config": {}}, "has no `metrics`"),
    ({"metrics": {"x": 3}}, "metrics['x'] must be {median, min, max}, got 3"),
    ({"metrics": {"x": {"median": "fast"}}}, "metrics['x']['median'] must be a number, got 'fast'"),
    ({"metrics": {"x": {"median": 1}}, "overrides": "planner=x"}, "`overrides` must be a list of key=value"),
    ({"metrics": {"x": {"median": 1}}, "config": []}, "`config` must be a JSON object"),
    ({"metrics": {"x": {"median": 1}}, "limits": {"two_lane_decode_tokens_per_s": "x"}},
     "limits['two_lane_decode_tokens_per_s'] must be a number"),
    ({"metrics": {"x": {"median": 1}}, "limits": {"ceilings_GBps": 3}}, "limits['ceilings_GBps'] must be"),
    ({"metrics": {"x": {"median": 1}}, "hardware": "gpu"}, "`hardware` must be a JSON object"),
])
def test_report_names_a_result_of_the_wrong_shape(tmp_path, result, problem):
    (tmp_path / "a").mkdir()
    path = tmp_path / "a" / "result.json"
    path.write_text(json.dumps(result))
    with pytest.raises(InvalidInputError) as info:
        report.report(str(tmp_path))
    assert str(path) in str(info.value) and problem in str(info.value), str(info.value)


# --- item 11 (the harness's part): defaults run, progress, the baseline's extra ---------------------------------

def _bundled_positions() -> int:
    from fiddler_jax.assets import default_model_path

    with open(os.path.join(default_model_path(), "config.json")) as f:
        return json.load(f)["max_position_embeddings"]


@pytest.mark.parametrize("scenario", ["decode", "prefill", "beam"])
def test_every_scenario_default_fits_the_default_model(scenario):
    """What bench runs for each scenario's defaults fits the default model's positions: prefill's 2048-token
    default prompt is shortened to 2047 on the bundled model (2048 positions), with a note saying so."""
    cfg = _compose(f"scenario={scenario}")
    assert cfg.model.name == "tiny" and cfg.model.path is None  # the bundled model is the default
    note = bench.fit_scenario(cfg)  # what bench does before loading anything
    s = cfg.scenario
    assert s.input_tokens + s.output_tokens <= _bundled_positions(), (scenario, s.input_tokens, s.output_tokens)
    if scenario == "prefill":
        assert s.input_tokens == 2047 and "running 2047 input tokens" in note and "2048 positions" in note
    else:
        assert note is None and s.input_tokens == 128
    assert bench.fit_scenario(_compose(f"scenario={scenario}", "model=mixtral_8x7b_random")) is None


@pytest.mark.parametrize("scenario,extra", [("prefill", []), ("decode", ["scenario.output_tokens=3"]),
                                            ("beam", ["scenario.output_tokens=3"])])
def test_bench_runs_each_scenario_at_its_default_input_on_the_default_model(tmp_path, scenario, extra, capsys):
    """The prefill default exactly as shipped (one timed run); decode and beam at their default prompt and beam
    width with fewer new tokens."""
    overrides = [f"scenario={scenario}", "repeats=1", "warmup=0", "placement.resident_experts=16", *extra]
    result = bench.run_bench(_compose(*overrides), str(tmp_path), job_overrides=overrides)
    assert result["metrics"]["latency_s"]["median"] > 0
    if scenario == "prefill":
        assert result["config"]["scenario"]["input_tokens"] == 2047 and "2047" in result["notes"][0]
        assert "note: scenario prefill: input_tokens 2048" in capsys.readouterr().out
    bench.release_engines()


def test_a_scenario_longer_than_the_model_fails_before_the_model_loads(monkeypatch, tmp_path):
    """An input length the user set is never shortened: it must fit, or bench refuses before loading weights."""
    monkeypatch.setattr(bench, "build_engine", lambda cfg: pytest.fail("the model was loaded"))
    overrides = ["scenario=prefill", "scenario.input_tokens=4096"]
    with pytest.raises(InvalidInputError, match=r"scenario.input_tokens=4096 \+ scenario.output_tokens=1 = 4097 "
                                                r"positions, more than model=tiny's max_position_embeddings "
                                                r"\(2048\).*at most 2047"):
        bench.run_bench(_compose(*overrides), str(tmp_path), job_overrides=overrides)
    overrides = ["model=mixtral_8x7b_random", "scenario=prefill", "scenario.input_tokens=40000"]
    with pytest.raises(InvalidInputError, match="max_position_embeddings \\(32768\\)"):
        bench.run_bench(_compose(*overrides), str(tmp_path), job_overrides=overrides)
    with pytest.raises(InvalidInputError, match="scenario.output_tokens=2048 leaves no room"):
        bench.run_bench(_compose("scenario.output_tokens=2048"), str(tmp_path))
    r = cli("bench", "scenario=prefill", "scenario.input_tokens=4096", cwd=tmp_path)
    _one_error_line(r, "scenario.input_tokens=4096", "at most 2047")
    assert "loading" not in r.stderr  # refused before the weights load


def test_ceilings_prints_a_line_per_measurement(tmp_path, capsys):
    from fiddler_jax.experiments import ceilings

    ceilings.main(["--budgets", "24GiB", "--host-gib", "0.02", "--h2d-gib", "0.01", "--hbm-gib", "0.01",
                   "--reps", "1", "--out", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    for step in ("[1/4] host read", "[2/4] pinned H2D", "[3/4] GPU HBM read", "[4/4] both lanes at once"):
        assert step in err, err
    assert err.count("GB/s") >= 4, err


def test_hf_accelerate_names_the_extra_that_installs_it(monkeypatch):
    import tomllib

    from fiddler_jax.experiments import baselines

    monkeypatch.setitem(sys.modules, "accelerate", None)  # not installed
    with pytest.raises(InvalidInputError) as info:
        baselines._require()
    message = str(info.value)
    assert "pip install 'fiddler-jax[baselines]'" in message and "\n" not in message, message
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project["optional-dependencies"]
    assert any(d.startswith("accelerate") for d in extras["baselines"])
    assert not any(d.startswith("accelerate") for d in extras["dev"] + project["dependencies"])
