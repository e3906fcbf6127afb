"""The embedded default model: a small Qwen3-MoE trained on the embedded corpus.

`load_embedded_model()` reads the committed checkpoint in `data/models/embedded/`
(built by `python -m moepaper.train_embedded`); no network, a few seconds on CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "models" / "embedded"

REGENERATE = "python -m moepaper.corpus && python -m moepaper.train_embedded"


def load_embedded_model(dtype: torch.dtype = torch.float32, path: Path | str = EMBEDDED_MODEL_DIR):
    """Return ``(model, tokenizer)`` of the embedded model, the model in eval mode on CPU.

    The checkpoint is stored in bfloat16; `dtype` is the dtype the model is cast to.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    missing = [name for name in ("config.json", "model.safetensors", "tokenizer.json") if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"embedded model files {', '.join(missing)} are missing in {path}; regenerate them with `{REGENERATE}`"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), tokenizer
