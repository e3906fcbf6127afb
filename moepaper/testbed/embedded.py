"""The embedded default model: a small Qwen3-MoE trained on the embedded corpus.

`load_embedded_model()` reads the committed checkpoint in `data/models/embedded/` of the
project root (built by `python -m moepaper.testbed.train`); no network, a few seconds on CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

REGENERATE = "python -m moepaper.testbed.corpus && python -m moepaper.testbed.tasks.build && python -m moepaper.testbed.train"


def embedded_model_dir() -> Path:
    """``data/models/embedded`` of the project root (`moepaper.project`)."""
    from ..project import DATA, project_root

    return project_root() / DATA / "models" / "embedded"


def load_embedded_model(dtype: torch.dtype = torch.float32, path: Path | str | None = None):
    """Return ``(model, tokenizer)`` of the embedded model, the model in eval mode on CPU.

    The checkpoint is stored in bfloat16; `dtype` is the dtype the model is cast to.
    path: the checkpoint folder (default `embedded_model_dir()`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else embedded_model_dir()
    missing = [name for name in ("config.json", "model.safetensors", "tokenizer.json") if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"embedded model files {', '.join(missing)} are missing in {path}; regenerate them with `{REGENERATE}`"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), tokenizer
