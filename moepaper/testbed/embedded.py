"""The embedded models: small Qwen3-MoEs trained on the embedded corpus, offline.

Two are committed under `data/models/<name>/` of the project root (`EMBEDDED_MODELS`):

- ``"embedded"`` (the default): fine-grained experts like the paper's models (64 experts,
  top-8), trained with a per-layer load-balancing loss (each MoE layer's own Switch-style
  loss, averaged over layers; `moepaper.testbed.train.per_layer_balance_loss`).
- ``"embedded-pooled"`` (the balance ablation): 16 experts, top-2, trained with transformers'
  built-in auxiliary loss, which pools the router counts of all layers, so inside one layer
  some experts receive almost no tokens.

`load_embedded_model(name)` reads one; no network, a few seconds on CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

EMBEDDED = "embedded"
EMBEDDED_POOLED = "embedded-pooled"
EMBEDDED_MODELS = (EMBEDDED, EMBEDDED_POOLED)

_DATA = "python -m moepaper.testbed.corpus && python -m moepaper.testbed.tasks.build"
# The command that rebuilds each model (after the corpus and the local suite, `_DATA`).
REGENERATE = {
    EMBEDDED: "python -m moepaper.testbed.train",
    EMBEDDED_POOLED: (
        "python -m moepaper.testbed.train --balance pooled --num-experts 16 --top-k 2 --moe-intermediate-size 128 "
        "--router-z-loss-coef 0 --budget-minutes 25 --max-steps 100000 --run-dir runs/train_embedded-pooled "
        "--out-dir data/models/embedded-pooled"
    ),
}
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _check_name(name: str) -> str:
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
    return name


def embedded_model_dir(name: str = EMBEDDED) -> Path:
    """``data/models/<name>`` of the project root (`moepaper.project`); `name` one of `EMBEDDED_MODELS`."""
    from ..project import DATA, project_root

    return project_root() / DATA / "models" / _check_name(name)


def load_embedded_model(name: str = EMBEDDED, dtype: torch.dtype = torch.float32, path: Path | str | None = None):
    """Return ``(model, tokenizer)`` of embedded model `name`, the model in eval mode on CPU.

    name: one of `EMBEDDED_MODELS` (ValueError naming them otherwise).
    dtype: the dtype the model is cast to (checkpoints are stored in bfloat16).
    path: the checkpoint folder (default `embedded_model_dir(name)`).
    A folder without the model's files raises FileNotFoundError naming the command that rebuilds it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(name, torch.dtype):  # the former signature load_embedded_model(dtype)
        raise TypeError("load_embedded_model(name, dtype=...): pass the dtype by keyword")
    _check_name(name)
    path = Path(path) if path is not None else embedded_model_dir(name)
    missing = [file for file in REQUIRED_FILES if not (path / file).exists()]
    if missing:
        raise FileNotFoundError(
            f"embedded model {name!r}: files {', '.join(missing)} are missing in {path}; "
            f"regenerate them with `{_DATA} && {REGENERATE[name]}`"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), tokenizer
