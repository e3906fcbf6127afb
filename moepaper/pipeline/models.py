"""One way to name a model everywhere (notebooks, scripts, tests): `load_model(spec)`.

A spec is one of
- ``"embedded"``: the embedded default model (`moepaper.testbed.embedded.load_embedded_model`), offline.
- ``"embedded-16e"``: the 16-expert first balance ablation (16 experts, top-2, pooled loss),
  offline; ``"embedded-seed1"`` (the default's recipe, training seed 1) and ``"embedded-pooled"``
  (the default's recipe with the pooled balance loss), offline; `EMBEDDED_MODELS` lists the
  committed embedded models (a model registered in `TO_TRAIN` raises, until trained, an error
  naming the command that trains it).
- ``"tiny:<family>"``: a tiny random-initialised model of a supported family
  (`moepaper.testbed.tiny.tiny_model`, e.g. ``"tiny:qwen3_moe"``) with its `tiny_tokenizer`, a
  character-level tokenizer that fits its 128-token vocabulary. For tests and the
  notebooks' CI parameter set: seconds, nothing downloaded, numbers meaningless.
- a key of `PAPER_MODELS` (``"olmoe"``, ``"deepseek_v2_lite"``, ``"ernie"``, ``"qwen3"``): the
  paper's checkpoint of that model.
- ``"rehearsal:<key>"``: that paper model at rehearsal size (`moepaper.pipeline.paper_models.
  rehearsal_model`: the real class and routing structure, toy width, random weights) with
  `rehearsal_tokenizer`: the tiny character tokenizer (101 ids, within the 512-token
  rehearsal vocabulary) plus a chat template (`REHEARSAL_CHAT_TEMPLATE`), so chat-formatted
  calibration sources take the chat path as with the real instruct checkpoints. For
  rehearsing the paper route offline (``python -m moepaper.reproduce --config paper --rehearsal``).
- anything else: a Hugging Face hub id or a local path, loaded with ``AutoModelForCausalLM``
  and ``AutoTokenizer``. Offline (``HF_HUB_OFFLINE=1``) a hub id that is not in the local
  cache raises `ModelNotAvailable` at once, naming the command that downloads it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..testbed.embedded import EMBEDDED, EMBEDDED_MODELS, TO_TRAIN  # noqa: F401 (EMBEDDED also imported from here)
from .paper_models import PAPER_MODELS, REHEARSAL_PREFIX  # the paper's four models: key -> HF id

TINY_PREFIX = "tiny:"
# A generic turn format (role tag, content, end-of-sequence) for the rehearsal tokenizer.
REHEARSAL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ModelNotAvailable(OSError):
    """The model named by a spec cannot be loaded here (offline and not cached, or no such path)."""


def _offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in truthy


def _dtype(dtype) -> torch.dtype | None:
    """A torch dtype from a dtype, its name ("bfloat16", "torch.float16") or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16'")
    return value


def _place(model, device_map):
    """Put an in-memory (tiny or embedded) model on one device: None / "cpu" / "cuda" / "auto"."""
    if device_map is None:
        return model
    if device_map == "auto":
        device_map = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device_map, (str, torch.device)):
        raise ValueError(f"device_map {device_map!r}: tiny and embedded models take one device ('cpu', 'cuda', 'auto')")
    return model.to(device_map)


def _load_tiny(family: str, dtype, device_map):
    from ..testbed.tiny import FAMILIES, tiny_model, tiny_tokenizer

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r} in model spec {TINY_PREFIX + family!r}; known: {', '.join(FAMILIES)}")
    model = tiny_model(family, dtype=dtype or torch.float32)
    model.config._name_or_path = TINY_PREFIX + family  # names the model in statistics metadata
    return _place(model, device_map), tiny_tokenizer(model.config.vocab_size)


def rehearsal_tokenizer(vocab_size: int):
    """The tiny character tokenizer with `REHEARSAL_CHAT_TEMPLATE` (ids must fit `vocab_size`)."""
    from ..testbed.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer(vocab_size)
    tokenizer.chat_template = REHEARSAL_CHAT_TEMPLATE
    return tokenizer


def _load_rehearsal(spec: str, dtype, device_map):
    from .paper_models import model_from_spec

    model = model_from_spec(spec, dtype=dtype or torch.float32)
    model.config._name_or_path = spec  # names the model in statistics metadata
    return _place(model, device_map), rehearsal_tokenizer(model.config.vocab_size)


def _load_embedded(name: str, dtype, device_map):
    from ..testbed.embedded import load_embedded_model

    model, tokenizer = load_embedded_model(name, dtype=dtype or torch.float32)
    return _place(model, device_map), tokenizer


def _check_available(name: str) -> None:
    """Raise ModelNotAvailable when offline and `name` is neither a local folder nor in the hub cache."""
    if Path(name).expanduser().exists():
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotAvailable(f"no model at {name!r}: the path does not exist")
    if not _offline():
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    raise ModelNotAvailable(
        f"model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it. "
        f"On a machine with network run `hf download {name}` (or unset HF_HUB_OFFLINE here), "
        f"or use an embedded model ({', '.join(EMBEDDED_MODELS)}; offline) or a tiny model ('tiny:qwen3_moe')."
    )


def resolve_model_name(spec: str) -> str:
    """The HF id or path a spec names: PAPER_MODELS keys map to their ids; anything else is itself."""
    return PAPER_MODELS.get(spec, spec)


def load_model(spec: str, *, dtype=None, device_map=None):
    """Return ``(model, tokenizer)`` for a model spec (see the module docstring), model in eval mode.

    dtype: a torch dtype or its name; None means float32 for tiny, rehearsal and embedded models and the
        checkpoint's own dtype (``"auto"``) for hub models.
    device_map: passed to ``from_pretrained`` for hub models (``"auto"`` spreads a model over the
        GPUs with accelerate); tiny and embedded models take one device (``"cpu"``, ``"cuda"``,
        ``"auto"`` = cuda when available). None leaves the model on the CPU.
    """
    spec = str(spec).strip()
    dtype = _dtype(dtype)
    if spec in EMBEDDED_MODELS + TO_TRAIN:  # a model not trained yet: an error naming its command
        return _load_embedded(spec, dtype, device_map)
    if spec.startswith(TINY_PREFIX):
        return _load_tiny(spec[len(TINY_PREFIX):], dtype, device_map)
    if spec.startswith(REHEARSAL_PREFIX):
        return _load_rehearsal(spec, dtype, device_map)
    name = resolve_model_name(spec)
    _check_available(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype or "auto"}
    if device_map is not None:
        kwargs["device_map"] = device_map
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    return model.eval(), tokenizer
