"""Dataset loaders for the local lm-eval tasks (referenced from the YAML files with `!function`).

lm-eval resolves relative `data_files` against the current directory; these loaders read
the JSON-lines files next to this module instead, so the tasks work from anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


def _load(name: str):
    import datasets

    path = DATA_DIR / f"{name}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"local task data {path} is missing; rebuild it with `python -m moepaper.testbed.tasks.build`")
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


# lm-eval calls custom_dataset(**metadata, **dataset_kwargs); the keyword arguments are not needed here.
def literature_ppl(**kwargs):
    return _load("literature_ppl")


def code_ppl(**kwargs):
    return _load("code_ppl")


def math_ppl(**kwargs):
    return _load("math_ppl")


def literature_mc(**kwargs):
    return _load("literature_mc")


def code_mc(**kwargs):
    return _load("code_mc")


def math_mc(**kwargs):
    return _load("math_mc")


def doc_to_choice(doc):
    return doc["choices"]
