"""The embedded models: small Qwen3-MoEs trained on the embedded corpus, offline.

Committed under `data/models/<name>/` of the project root (`EMBEDDED_MODELS`):

- ``"embedded"`` (the default): fine-grained experts like the paper's models (64 experts,
  top-8), trained with a per-layer load-balancing loss (each MoE layer's own Switch-style
  loss, averaged over layers; `moepaper.testbed.train.per_layer_balance_loss`).
- ``"embedded-16e"``: the first balance ablation, 16 experts of width 128, top-2, trained 25
  minutes with transformers' built-in auxiliary loss, which pools the router counts of all
  layers, so inside one layer some experts receive almost no tokens. It differs from the
  default in more than balance (experts, top-k, width, tokens); it was called
  ``embedded-pooled`` until that name went to the same-shape ablation.

- ``"embedded-seed1"``: the default's recipe with training seed 1 (initialisation and data
  order): how much of a result survives retraining the model.

- ``"embedded-pooled"`` (the same-shape balance ablation): the default's shape, data, steps and
  seed with transformers' pooled auxiliary loss instead of the per-layer one: its only difference.

The default and the 16-expert model were trained against a 48- and 25-minute wall-clock budget;
the default's 1,792 steps are the step count the same-recipe models train for
(`--max-steps 1792`, no budget, no early stop), so their schedules follow steps, not the clock.

`load_embedded_model(name)` reads one; no network, a few seconds on CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

EMBEDDED = "embedded"
EMBEDDED_POOLED = "embedded-pooled"
EMBEDDED_SEED1 = "embedded-seed1"
EMBEDDED_16E = "embedded-16e"
# The default's exact recipe but for one thing each (balance loss; training seed).
SAME_RECIPE = (EMBEDDED_POOLED, EMBEDDED_SEED1)
EMBEDDED_MODELS = (EMBEDDED, EMBEDDED_16E, EMBEDDED_SEED1, EMBEDDED_POOLED)  # committed under data/models/
# Registered with their training commands, not trained yet (a model is moved to EMBEDDED_MODELS
# when committed; `load_embedded_model` names the command of one listed here): none at present.
TO_TRAIN: tuple[str, ...] = ()

_DATA = "python -m moepaper.testbed.corpus && python -m moepaper.testbed.tasks.build"
# The command that rebuilds each model (after the corpus and the local suite, `_DATA`).
# The same-recipe models: the default's 1,792 steps, no wall-clock budget and no early stop.
_SAME_RECIPE = "--max-steps 1792 --budget-minutes 100000 --patience 100000"
REGENERATE = {
    EMBEDDED: "python -m moepaper.testbed.train",
    EMBEDDED_POOLED: (
        f"python -m moepaper.testbed.train --balance pooled {_SAME_RECIPE} --run-dir runs/train_embedded-pooled "
        "--out-dir data/models/embedded-pooled"
    ),
    EMBEDDED_SEED1: (
        f"python -m moepaper.testbed.train --seed 1 {_SAME_RECIPE} --run-dir runs/train_embedded-seed1 "
        "--out-dir data/models/embedded-seed1"
    ),
    EMBEDDED_16E: (
        "python -m moepaper.testbed.train --balance pooled --num-experts 16 --top-k 2 --moe-intermediate-size 128 "
        "--router-z-loss-coef 0 --budget-minutes 25 --max-steps 100000 --run-dir runs/train_embedded-16e "
        "--out-dir data/models/embedded-16e"
    ),
}
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _check_name(name: str) -> str:
    if name not in EMBEDDED_MODELS + TO_TRAIN:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS + TO_TRAIN)}")
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
    if missing and name in TO_TRAIN and not path.exists():
        raise FileNotFoundError(f"embedded model {name!r} is not trained yet (no {path}); train it with `{REGENERATE[name]}`")
    if missing:
        raise FileNotFoundError(
            f"embedded model {name!r}: files {', '.join(missing)} are missing in {path}; "
            f"regenerate them with `{_DATA} && {REGENERATE[name]}`"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), tokenizer
