"""`python -m moepaper.testbed.tasks.build`: make the local lm-eval task data from the corpus test split.

Writes `moepaper/tasks/local/data/<domain>_{ppl,mc}.jsonl` (seeded, deterministic):

- ppl: up to `PPL_DOCUMENTS` test documents, evenly spaced through the split, ``{"text"}``.
- mc (code): line completion, one item per test document at a random eligible line. The
  line is cut at the space nearest its middle; the context is the preceding lines (at most
  `CONTEXT_LINES`, at most `CONTEXT_CHARS` characters) and the line's first half; the
  choices are its true second half and the second halves of three lines from other test
  documents of the same domain, within ±30% of its length.
- mc (literature): the same cut and context; the choices are the true second half and
  three copies of it with one pair of adjacent words swapped (a different pair in each;
  at least four words), so every choice has the same words and only their order tells
  them apart.
  History: the first version of both tasks offered whole next lines against lines from
  elsewhere; the embedded model scored 30.7% (literature) and 32.9% (code) against 25%
  chance. Line completion with other lines' halves lifted code to 46.6% but literature
  only to 32.7%, so literature uses word order (fully shuffled halves gave 93%, near the
  ceiling; single adjacent swaps are subtler), per the rule that a task the unpruned
  model is not clearly above chance on is replaced.
- mc (math): a random held-out problem, its worksheet's earlier lines as context, the
  correct answer against three near misses drawn from answer ±1, ±2, ±10 (non-negative).

Each item is ``{"context", "choices", "gold"}``; the gold position is shuffled by the seed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from ..corpus import DOMAINS, read_split

DATA_DIR = Path(__file__).resolve().parent / "local" / "data"
PPL_DOCUMENTS = 250
MC_ITEMS = 300
CONTEXT_LINES = 6
CONTEXT_CHARS = 400
MIN_LINE_CHARS = {"literature": 25, "code": 20}


def ppl_items(documents: list[str]) -> list[dict]:
    if len(documents) <= PPL_DOCUMENTS:
        return [{"text": d} for d in documents]
    step = len(documents) / PPL_DOCUMENTS
    return [{"text": documents[int(i * step)]} for i in range(PPL_DOCUMENTS)]


def _shuffled_item(context: str, answer: str, distractors: list[str], rng: random.Random) -> dict:
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "gold": choices.index(answer)}


def split_line(line: str) -> tuple[str, str] | None:
    """Cut a line at the space nearest its middle (after the indentation): (prefix, rest).

    The rest starts with that space. None when no cut leaves 8 characters on each side.
    """
    indent = len(line) - len(line.lstrip())
    cuts = [i for i, c in enumerate(line) if c == " " and i - indent >= 8 and len(line) - i >= 8]
    if not cuts:
        return None
    cut = min(cuts, key=lambda i: abs(i - len(line) / 2))
    return line[:cut], line[cut:]


def line_completion_items(documents: list[str], domain: str, rng: random.Random) -> list[dict]:
    """Complete a held-out line: its true second half against the second halves of three
    other lines of similar length from other test documents of the same domain."""
    min_chars = MIN_LINE_CHARS[domain]
    lines = [doc.split("\n") for doc in documents]
    pool = [
        (i, parts[1]) for i, doc_lines in enumerate(lines) for line in doc_lines
        if len(line.strip()) >= min_chars and (parts := split_line(line))
    ]
    items = []
    for doc_index in rng.sample(range(len(documents)), len(documents)):
        doc_lines = lines[doc_index]
        eligible = [j for j in range(1, len(doc_lines)) if len(doc_lines[j].strip()) >= min_chars and split_line(doc_lines[j])]
        if not eligible:
            continue
        j = rng.choice(eligible)
        prefix, answer = split_line(doc_lines[j])
        context_lines = doc_lines[max(0, j - CONTEXT_LINES) : j]
        while len("\n".join(context_lines)) > CONTEXT_CHARS and len(context_lines) > 1:
            context_lines = context_lines[1:]
        similar = {
            rest for i, rest in pool
            if i != doc_index and 0.7 * len(answer) <= len(rest) <= 1.3 * len(answer) and rest.strip() != answer.strip()
        }
        if len(similar) < 3:
            continue
        context = "\n".join(context_lines) + "\n" + prefix
        items.append(_shuffled_item(context, answer, rng.sample(sorted(similar), 3), rng))
        if len(items) == MC_ITEMS:
            break
    return items


def word_order_items(documents: list[str], domain: str, rng: random.Random) -> list[dict]:
    """Complete a held-out line: its true second half against three copies with one pair of
    adjacent words swapped (a different pair in each)."""
    min_chars = MIN_LINE_CHARS[domain]
    items = []
    for doc_index in rng.sample(range(len(documents)), len(documents)):
        doc_lines = documents[doc_index].split("\n")
        eligible = []
        for j in range(1, len(doc_lines)):
            parts = split_line(doc_lines[j]) if len(doc_lines[j].strip()) >= min_chars else None
            if parts and len(parts[1].split()) >= 4 and parts[1] == " " + " ".join(parts[1].split()):
                eligible.append(j)
        if not eligible:
            continue
        j = rng.choice(eligible)
        prefix, answer = split_line(doc_lines[j])
        words = answer.split()
        swaps = set()
        for k in range(len(words) - 1):  # one pair of adjacent words swapped
            swapped = words[:k] + [words[k + 1], words[k]] + words[k + 2 :]
            if swapped != words:
                swaps.add(" " + " ".join(swapped))
        if len(swaps) < 3:
            continue
        distractors = rng.sample(sorted(swaps), 3)
        context_lines = doc_lines[max(0, j - CONTEXT_LINES) : j]
        while len("\n".join(context_lines)) > CONTEXT_CHARS and len(context_lines) > 1:
            context_lines = context_lines[1:]
        context = "\n".join(context_lines) + "\n" + prefix
        items.append(_shuffled_item(context, answer, distractors, rng))
        if len(items) == MC_ITEMS:
            break
    return items


def near_misses(answer: int, rng: random.Random) -> list[int]:
    candidates = sorted({answer + d for d in (-10, -2, -1, 1, 2, 10)} - {answer})
    return rng.sample([c for c in candidates if c >= 0], 3)


def arithmetic_items(documents: list[str], rng: random.Random) -> list[dict]:
    """A held-out problem's correct result against three near misses."""
    problems = []
    for doc in documents:
        doc_lines = doc.split("\n")
        for j, line in enumerate(doc_lines):
            prompt, _, answer = line.rpartition(" ")
            problems.append(("\n".join(doc_lines[:j] + [prompt]), int(answer)))
    items = []
    for context, answer in rng.sample(problems, MC_ITEMS):
        choices = [f" {x}" for x in near_misses(answer, rng)]
        items.append(_shuffled_item(context, f" {answer}", choices, rng))
    return items


def build_local_tasks(seed: int = 0) -> dict[str, int]:
    """Write every task's data file; return the number of items per file."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    written = {}
    for domain in DOMAINS:
        documents = read_split(domain, "test")
        rng = random.Random(f"{seed}-{domain}-tasks")
        if domain == "math":
            mc = arithmetic_items(documents, rng)
        elif domain == "literature":
            mc = word_order_items(documents, domain, rng)
        else:
            mc = line_completion_items(documents, domain, rng)
        for kind, rows in (("ppl", ppl_items(documents)), ("mc", mc)):
            path = DATA_DIR / f"{domain}_{kind}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            written[path.name] = len(rows)
    for name, n in written.items():
        print(f"{name}: {n} items")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the local lm-eval task data from the corpus test split.")
    parser.add_argument("--seed", type=int, default=0)
    build_local_tasks(seed=parser.parse_args(argv).seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
