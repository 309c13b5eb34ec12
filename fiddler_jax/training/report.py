"""What a training run leaves next to the weights: the loss-curve PNG, ``training_metrics.json`` and the model
card ``README.md``."""
from __future__ import annotations

import json
import os


NAMES = {"mixtral": ("tiny-mixtral", "Mixtral"), "qwen3_moe": ("tiny-qwen3-moe", "Qwen3-MoE"),
         "olmoe": ("tiny-olmoe", "OLMoE"), "qwen2_moe": ("tiny-qwen2-moe", "Qwen2-MoE")}


RECIPES = {"mixtral": "tiny", "qwen3_moe": "tiny_qwen3_moe"}  # conf/train/<recipe>.yaml of each bundled model


def model_name(geometry: dict) -> str:
    """The bundled name of a trained model of this family (``tiny-mixtral``, ``tiny-qwen3-moe``, ...)."""
    return NAMES[geometry.get("model_type", "mixtral")][0]


def plot_loss_curve(history: dict, path: str, unigram_nll: float | None = None,
                    title: str = "tiny-mixtral training") -> None:
    """Training NLL (raw and smoothed) and held-out NLL against the step, with the unigram baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps, nll = history["step"], history["nll"]
    ax.plot(steps, nll, color="tab:blue", alpha=0.25, lw=0.8, label="train NLL (per step)")
    smooth, ema = [], None
    for v in nll:
        ema = v if ema is None else 0.95 * ema + 0.05 * v
        smooth.append(ema)
    ax.plot(steps, smooth, color="tab:blue", lw=1.5, label="train NLL (EMA 0.95)")
    if history.get("eval_step"):
        ax.plot(history["eval_step"], history["eval_nll"], "o-", color="tab:orange", ms=3, label="held-out NLL")
    if unigram_nll is not None:
        ax.axhline(unigram_nll, color="gray", ls="--", lw=1, label="unigram baseline (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_ylim(0, max(nll[:1] + [unigram_nll or 0]) * 1.05 if nll else None)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _routing_table(routing: list[dict]) -> str:
    rows = ["| layer | imbalance (max/min share) | load entropy / log E | router entropy / log E | min share | "
            "max share |", "|---|---|---|---|---|---|"]
    for r in routing:
        rows.append(f"| {r['layer']} | {r['imbalance']:.2f} | {r['load_entropy']:.3f} | {r['router_entropy']:.3f} | "
                    f"{r['min_share']:.1%} | {max(r['share']):.1%} |")
    return "\n".join(rows)


def model_card(m: dict) -> str:
    """Markdown model card from the metrics dict written by ``fiddler-jax train-tiny``."""
    from fiddler_jax.models.config import FAMILIES

    g, t, d, e = m["geometry"], m["train"], m["data"], m["eval"]
    params = m["parameters"]
    family = g.get("model_type", "mixtral")
    name, label = NAMES[family]
    recipe = RECIPES.get(family)
    experts = g.get("num_local_experts", g.get("num_experts"))
    role = {"mixtral": "the bundled default model of fiddler-jax",
            "qwen3_moe": "fiddler-jax's bundled fine-grained MoE, beside the default tiny-mixtral (same corpus, "
                         "tokenizer and recipe; the same expert parameters per layer, split into more, smaller "
                         "experts)"}.get(family, "a model of fiddler-jax's train-tiny")
    return f"""# {name}

A {params / 1e6:.1f} M-parameter {label} (sparse mixture of experts) trained from scratch by `fiddler-jax train-tiny`
on Python source code, shipped as {role}. It exists so that demos, routing
statistics and tests run on a model whose routing is *learned*. It is a toy: it writes Python-looking text, not
correct programs.

Load it with `fiddler_jax.load_pretrained(path)` or `transformers.{FAMILIES[family]}.from_pretrained(path)`; the
tokenizer with `transformers.AutoTokenizer.from_pretrained(path)`.

## Geometry
| | |
|---|---|
| layers | {g['num_hidden_layers']} |
| experts / active per token | {experts} / {g['num_experts_per_tok']} (top-{g['num_experts_per_tok']}{', renormalised' if g.get('norm_topk_prob', family == 'mixtral') else ''}) |
| hidden / expert FFN | {g['hidden_size']} / {g.get('moe_intermediate_size', g['intermediate_size'])} (SwiGLU) |
| attention | {g['num_attention_heads']} query heads, {g['num_key_value_heads']} KV heads (GQA), head_dim {g['head_dim']}, RoPE θ={g['rope_theta']:g} |
| vocabulary | {m['vocab_size']} (byte-level BPE), {'tied' if g['tie_word_embeddings'] else 'untied'} embeddings |
| context | trained on {t['seq_len']}-token windows; max_position_embeddings {g['max_position_embeddings']} |
| parameters | {params:,} ({m['active_parameters']:,} active per token); weights stored in bfloat16 |

## Corpus and tokenizer
The `.py` files of the CPython {d['python']} standard library (`{d['corpus_root']}`, third-party
`site-packages` excluded, test suites {'included' if d['include_tests'] else 'excluded'}): {d['train_files']} training files
({d['train_chars'] / 1e6:.1f} M characters, {d['train_tokens'] / 1e6:.2f} M tokens) and {d['heldout_files']} held-out files
({d['heldout_tokens'] / 1e3:.0f} k tokens). The split is by file: a file is held out iff
int(sha256(relative path)[:8], 16) mod 10000 < {d['heldout_fraction']} · 10000. Corpus sha256 (paths and contents):
`{d['corpus_sha256']}`; the held-out file list is in `training_metrics.json`. Each file enters the token stream as
`<s> text </s>`. The tokenizer is a byte-level BPE (GPT-2 pre-tokenizer, all 256 bytes in the vocabulary) trained
with `tokenizers` on the training files only; `<unk>`=0, `<s>`=1 (prepended when encoding), `</s>`=2.

## Training
AdamW (β=(0.9, 0.95), weight decay {t['weight_decay']} on matrices), peak learning rate {t['lr']:g}, {t['warmup_steps']} warm-up steps, cosine
decay to {t['final_lr_fraction']:g}× peak, global-norm clipping at {t['clip_norm']:g}; loss = next-token cross-entropy +
{t['aux_loss_coef']:g} × the Switch / Mixtral load-balancing loss (mean over layers). {t['steps']} steps of {t['batch_size']} random
{t['seq_len']}-token windows ({t['steps'] * t['batch_size'] * t['seq_len'] / 1e6:.0f} M tokens, {t['steps'] * t['batch_size'] * t['seq_len'] / d['train_tokens']:.1f} passes over the data), float32
master weights and float32 compute (MoE path: `{t['moe_impl']}`), seed {m['seed']}.
Trained on {m['device']} in {m['train_seconds'] / 60:.1f} min ({m['tokens_per_second'] / 1e3:.0f} k tokens/s; jax {m['jax_version']}).

![loss curve](loss_curve.png)

## Quality (held-out files, the shipped bfloat16 weights computed in float32)
Over {e['heldout_tokens']:,} held-out tokens: perplexity **{e['heldout_perplexity']:.2f}**
(NLL {e['heldout_nll']:.3f} nats/token), against **{e['unigram_perplexity']:.1f}** for a unigram model of the training
tokens (add-one smoothing) on the same tokens.

Routing over the same tokens (share = fraction of the token·top-k assignments; uniform = {1 / experts:.1%}):

{_routing_table(e['routing'])}

Every expert receives at least {min(r['min_share'] for r in e['routing']):.1%} of the assignments in every layer (no dead expert). The
router entropy per token is {min(r['router_entropy'] for r in e['routing']):.2f}-{max(r['router_entropy'] for r in e['routing']):.2f} of the uniform maximum (a random router gives ≈1), so tokens
are routed decisively while the load over the corpus stays balanced by the auxiliary loss.

Greedy continuation of `def fibonacci(n):` ({m['demo_tokens']} tokens, float32):
```python
{m['demo']}
```

## Reproduce
The command that produced these weights{' (' + m['where'] + ')' if m.get('where') else ''}:
```
{m['command']}
```
With the defaults of `conf/train_tiny.yaml` + {f'`conf/train/{recipe}.yaml`' if recipe else 'the overrides above'} (the recipe above), on CPython
{d['python']} and a GPU, `fiddler-jax train-tiny {'' if recipe in ('tiny', None) else f'train={recipe} '}out=<folder>` repeats it from scratch (about a minute of
corpus and tokenizer work on the CPU first). The byte-identical rerun with the same seed is checked by the test
suite on the CPU; on GPUs XLA's deterministic ops are switched on (`deterministic=true`) for the same purpose.
A different Python version has a different standard library, hence a different corpus and model.
"""


def write_report(metrics: dict, folder: str) -> None:
    with open(os.path.join(folder, "training_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(model_card(metrics))
