"""The ``fiddler-jax`` command, run as users run it (a subprocess), on a model it created itself."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import fiddler_jax as fj


def cli(*args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "fiddler_jax.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    work = tmp_path_factory.mktemp("cli")
    out = work / "model"
    r = cli("init-random", f"out={out}", "seed=3", "geometry.num_hidden_layers=2", "geometry.hidden_size=64",
            cwd=work)
    assert r.returncode == 0, r.stderr
    return work, out


def test_generate_prints_the_same_tokens_as_the_api(random_model):
    work, model_dir = random_model
    r = cli("generate", f"model.path={model_dir}", "prompt_ids=[1,5,9]", "max_new_tokens=12", cwd=work)
    assert r.returncode == 0, r.stderr
    printed = re.search(r"generated ids: \[([\d, ]+)\]", r.stdout)
    assert printed and re.search(r"decode [\d.]+ tokens/s", r.stdout), r.stdout
    expected = fj.generate(fj.load_pretrained(model_dir, progress=False), np.array([[1, 5, 9]]), 12)[0, 3:]
    assert [int(t) for t in printed.group(1).split(",")] == expected.tolist()


def test_init_random_is_seeded(random_model, tmp_path):
    work, model_dir = random_model
    r = cli("init-random", f"out={tmp_path / 'again'}", "seed=3", "geometry.num_hidden_layers=2",
            "geometry.hidden_size=64", cwd=work)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()


@pytest.mark.parametrize("args,message", [
    (["generate", "model.path=/no/such/folder", "prompt_ids=[1]"], "model folder '/no/such/folder' does not exist"),
    (["generate", "MODEL_DIR", "prompt=hello"], "has no tokenizer files"),
    (["generate", "MODEL_DIR", "prompt_ids=[1,100000]"], "outside the vocabulary"),
    (["init-random", "out=MODEL_DIR_RAW"], "already holds a model; pass overwrite=true"),
    (["generate", "MODEL_DIR", "prompts_file=/no/such/prompts.txt"], "prompts_file /no/such/prompts.txt does not exist"),
    (["generate", "MODEL_DIR", "prompt_ids=[1]", "batch_size=4"], "out and batch_size go with prompts_file"),
    (["generate", "MODEL_DIR", "prompt_ids=[1]", "prompts_file=PROMPTS"], "give one of prompt=<text>, prompt_ids"),
    (["generate", "MODEL_DIR", "prompts_file=PROMPTS_TXT"], "is text, but the model has no tokenizer files"),
    (["generate", "MODEL_DIR", "prompts_file=BAD_JSONL"], 'line 2: each line must be an object with "prompt"'),
    (["generate", "MODEL_DIR", "prompts_file=BAD_LIMIT"], 'line 1: "max_new_tokens" must be a non-negative integer'),
])
def test_bad_input_gives_one_clear_line(random_model, args, message):
    work, model_dir = random_model
    (work / "p.jsonl").write_text('{"prompt_ids": [1, 5]}\n')
    (work / "p.txt").write_text("hello\n")
    (work / "bad.jsonl").write_text('{"prompt_ids": [1, 5]}\n[3, 4]\n')
    (work / "bad_limit.jsonl").write_text('{"prompt_ids": [1, 5], "max_new_tokens": -1}\n')
    files = {"PROMPTS_TXT": work / "p.txt", "PROMPTS": work / "p.jsonl", "BAD_JSONL": work / "bad.jsonl",
             "BAD_LIMIT": work / "bad_limit.jsonl"}
    args = [a.replace("MODEL_DIR_RAW", str(model_dir)).replace("MODEL_DIR", f"model.path={model_dir}") for a in args]
    for name, path in files.items():
        args = [a.replace(name, str(path)) for a in args]
    r = cli(*args, cwd=work)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_unknown_command_and_typo_in_config(random_model):
    work, _ = random_model
    r = cli("generat", cwd=work)
    assert r.returncode == 2 and "unknown command 'generat'" in r.stderr
    r = cli("generate", "max_new_tokenz=3", cwd=work)
    assert r.returncode != 0 and "max_new_tokenz" in r.stderr


def test_bench_kernel_quick_writes_json(tmp_path):
    """`fiddler-jax bench-kernel` runs end to end (tiny shapes) and writes its JSON with the provenance fields."""
    import json

    out = tmp_path / "bench.json"
    r = cli("bench-kernel", "--hidden", "64", "--ffn", "96", "--ns", "1,8", "--budget", "0.05", "--no-xla",
            "--no-torch", "--no-sweeps", "--experts", "2", "--json", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"git_sha", "versions", "cpu_features", "rows", "read_bandwidth_GiBps"} <= set(result)
    assert {1, 8} <= {row["n"] for row in result["rows"]}
    assert r.stdout.rstrip().splitlines()[-1].split()[0] in {"grouped", "expert"}  # the table is printed last


def test_text_prompt_with_brackets_on_the_bundled_model(tmp_path):
    """The README's quoting of a text prompt works, and the bundled model answers with the prompt echoed."""
    r = cli("generate", 'prompt="def area(r):"', "max_new_tokens=8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("def area(r):") and "tokens/s" in r.stdout


def test_generate_through_the_hybrid_engine_matches_the_plain_model(tmp_path):
    """`fiddler-jax generate` with experts offloaded prints the plain model's text, the engine summary, and
    writes the Perfetto trace; every planner group entry composes."""
    plain = cli("generate", "max_new_tokens=10", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-2000:]
    text = plain.stdout.split("\n[")[0]
    for planner in ("cpu_only", "fiddler", "transfer"):
        trace = tmp_path / f"{planner}.json"
        r = cli("generate", "max_new_tokens=10", "engine.resident_experts=8", f"planner={planner}",
                f"engine.trace={trace}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split("\n[")[0] == text and "planned layer steps" in r.stdout and trace.exists()
    r = cli("generate", "engine.trace=x.json", cwd=tmp_path)
    assert r.returncode == 2 and "engine.trace needs the hybrid engine" in r.stderr


def test_generate_a_prompts_file_in_batches_writes_one_line_per_prompt(random_model):
    """prompts_file + batch_size: one JSON line per prompt, in the file's order, each row's new tokens (up to its
    own max_new_tokens when the line gives one) equal to generating its prompt alone (through the API), through the
    plain model and the hybrid engine alike; a missing out folder is made; nothing but the output file is
    written."""
    import json

    work, model_dir = random_model
    prompts = [[1, 5, 9], [1, 7], [1, 2, 3, 4, 8, 6], [1, 11, 12, 13], [1, 40]]
    limits = [None, 2, None, None, None]  # the second prompt has its own max_new_tokens
    (work / "many.jsonl").write_text("".join(
        json.dumps({"prompt_ids": p, **({} if n is None else {"max_new_tokens": n})}) + "\n"
        for p, n in zip(prompts, limits)))
    model = fj.load_pretrained(model_dir, progress=False)
    expected = [fj.generate(model, np.array([p]), n or 6, eos_token_id=[])[0, len(p):].tolist()
                for p, n in zip(prompts, limits)]
    for extra, out in (([], work / "plain" / "out.jsonl"), (["engine.resident_experts=4"], work / "hybrid.jsonl")):
        r = cli("generate", f"model.path={model_dir}", f"prompts_file={work / 'many.jsonl'}", "batch_size=2",
                "max_new_tokens=6", f"out={out}", *extra, cwd=work)
        assert r.returncode == 0, r.stderr
        assert f"wrote 5 outputs to {out}" in r.stdout
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert [line["index"] for line in lines] == list(range(5))
        assert [line["prompt_ids"] for line in lines] == prompts
        for line, want in zip(lines, expected):
            eos = [n for n, t in enumerate(want) if t in model.config.eos_token_ids]
            assert line["output_ids"] == (want[:eos[0] + 1] if eos else want)
            assert line["finish"] == ("eos" if eos else "length") and line["prompt"] is None
        assert not list(out.parent.glob("*.partial"))
