"""``fiddler-jax profile``: count router choices per (layer, expert) over a text corpus and save the profile
that ``placement=popularity`` reads."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig

from fiddler_jax.errors import InvalidInputError
from fiddler_jax.experiments.model_group import checkpoint_path
from fiddler_jax.experiments.common import CONF_DIR, check_output_path, clear_errors, write_output
from fiddler_jax.experiments.schemas import ModelSchema


@dataclass
class ProfileConfig:
    model: ModelSchema = field(default_factory=ModelSchema)
    data: str | None = None  # a text file, or a folder of .py/.txt files; null = held-out stdlib files
    seq_len: int = 256
    batch_size: int = 8
    max_tokens: int = 200_000
    out: str | None = None  # profile file; null = fiddler-jax-outputs/profile/<date>_<time>/profile.json


ConfigStore.instance().store(name="profile_schema", node=ProfileConfig)


def text_documents(data: str | None) -> tuple[list[str], str]:
    """The documents to profile on and a description of where they came from."""
    from fiddler_jax.training.corpus import find_corpus, read_source

    if data is None:
        corpus = find_corpus()
        return [corpus.read(rel) for rel in corpus.heldout], f"held-out stdlib files of {corpus.root}"
    path = os.path.expanduser(data)
    if os.path.isfile(path):
        return [read_source(path)], path
    if os.path.isdir(path):
        docs = [read_source(os.path.join(d, f)) for d, _, files in sorted(os.walk(path)) for f in sorted(files)
                if f.endswith((".py", ".txt", ".md"))]
        if docs:
            return docs, path
    raise InvalidInputError(f"data={data!r} is neither a text file nor a folder of .py/.txt/.md files")


def token_windows(tokenizer, docs: list[str], seq_len: int, max_tokens: int):
    """Concatenate the tokenised documents and cut the stream into windows of ``seq_len`` tokens."""
    import numpy as np

    stream, have = [], 0
    for doc in docs:
        ids = tokenizer(doc, verbose=False)["input_ids"]
        stream.append(np.asarray(ids, np.int64))
        have += len(ids)
        if have >= max_tokens:
            break
    flat = np.concatenate(stream)[:max_tokens] if stream else np.zeros(0, np.int64)
    n = len(flat) // seq_len
    return [flat[i * seq_len:(i + 1) * seq_len] for i in range(n)]


@hydra.main(config_path=CONF_DIR, config_name="profile", version_base="1.3")
@clear_errors
def main(cfg) -> None:
    import fiddler_jax as fj
    from fiddler_jax.runtime.profiling import profile_routing

    if cfg.seq_len < 1 or cfg.batch_size < 1 or cfg.max_tokens < cfg.seq_len:
        raise InvalidInputError("seq_len and batch_size must be ≥ 1 and max_tokens ≥ seq_len")
    out = check_output_path(cfg.out or os.path.join(HydraConfig.get().runtime.output_dir, "profile.json"),
                            "the profile")  # before minutes of profiling
    path = checkpoint_path(cfg.model)
    model = fj.load_pretrained(path, dtype=cfg.model.dtype)
    tokenizer = fj.load_tokenizer(path)
    if tokenizer is None:
        raise InvalidInputError(f"{path} has no tokenizer files; profiling needs one to encode the text")
    docs, source = text_documents(cfg.data)
    windows = token_windows(tokenizer, docs, cfg.seq_len, cfg.max_tokens)
    profile = profile_routing(model, windows, batch_size=cfg.batch_size, source=source,
                              total=len(windows) * cfg.seq_len)
    write_output(out, "the profile", profile.save)
    shares = profile.shares()
    print(f"profiled {profile.tokens} tokens from {source}")
    for layer, row in enumerate(shares):
        order = row.argsort()[::-1]
        print(f"layer {layer:2d}: " + "  ".join(f"e{e}={row[e]:.1%}" for e in order))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
