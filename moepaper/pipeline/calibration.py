"""Calibration data: the paper's three sources, and the embedded corpus offline.

`calibration_batches(source, tokenizer, n_sequences=..., seq_len=..., seed=...)` yields
batches of packed token sequences ({"input_ids", "attention_mask"}, [B, T]) for
`moepaper.collect_statistics`. Documents are shuffled with `seed`, tokenised, joined
with the end-of-sequence token and cut into windows of exactly `seq_len` tokens, so
every token is real text (no padding) and the sequence count is exact.

Sources (`SOURCES` below is the one table of ids, splits and fields):
- ``"c4"``: English C4 (task-agnostic calibration of the paper), plain text.
- ``"code"``: evol-codealpaca (task-specific, code), instruction / output pairs.
- ``"math"``: Tulu-3 SFT personas-math (task-specific, math), chat messages.
  Chat-style samples are formatted with the tokenizer's chat template when it has one,
  else as the turns' texts separated by blank lines.
- ``"embedded:literature"``, ``"embedded:code"``, ``"embedded:math"``: the calibration
  split of one domain of the embedded corpus (`moepaper.testbed.corpus`), offline.
- ``"embedded:mixed"``: the three embedded domains interleaved document by document in
  equal shares: the task-agnostic calibration set of the embedded model.
- ``"standin:c4"``, ``"standin:code"``, ``"standin:math"``: the hub source of that key with
  its records read from the repository's stand-in rows (`moepaper.pipeline.standin.
  calibration_standin`, the hub schema) instead of the hub; formatting (chat template),
  shuffling and packing are the real source's. For rehearsing the paper route offline.

Calibration draws: `seed` shuffles the documents before packing, so another seed draws other
windows of the same source. A draw is named `calibration_name(source, seed)` in results,
tables and paths: the source itself for seed 0 (``"embedded:mixed"``), the source with
``@seed<k>`` for seed k > 0 (``"embedded:mixed@seed1"``; slug ``embedded-mixed-seed1``).
`parse_calibration_name` inverts it. Seeded draws of one source overlap: each shuffles the same
documents, so two draws of a small split share most of their text.

Disjoint draws: ``disjoint_draws(source, n)`` names the n draws of `source` that share no text,
``"<source>@draw<k>of<n>"`` (``"embedded:literature@draw1of3"``; slug ``embedded-literature-draw1of3``).
Draw k reads only the documents of part k of a fixed partition of the split (every document
belongs to exactly one part: position mod n in one fixed shuffle, per domain for the mixed
source), so no document, and no window, is in two draws. A draw's name is a source like any
other: pass it wherever a source goes (`calibration_batches`, notebook 01's ``calibration``),
with seed 0. `parse_calibration_name` gives ``(source, k)`` for it, so tables group the draws
of one source as they group seeds.

The hub sources are streamed through `datasets` when online. Offline (``HF_HUB_OFFLINE``
or ``HF_DATASETS_OFFLINE`` set) they are read from the local `datasets` cache; when they
are not there, or when the hub cannot be reached, `CalibrationDataUnavailable` says within
a couple of seconds what to download and how.
"""

from __future__ import annotations

import os
import random
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

import torch


@dataclass(frozen=True)
class HubSource:
    """One calibration dataset on the Hugging Face hub.

    Fields
    ------
    path: dataset id.
    name: dataset config (subset), or None.
    split: split to read.
    data_files: files to read instead of the whole dataset (C4: one shard of 1024), or None.
    text_field: field holding plain text (C4), or None for chat-style records.
    messages_field: field holding a list of ``{"role", "content"}`` turns, or None.
    prompt_field / response_field: fields of a single-turn instruction / answer pair.
    role: what the paper uses it for.
    """

    path: str
    name: str | None
    split: str
    data_files: str | None = None
    text_field: str | None = None
    messages_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    role: str = ""

    @property
    def chat(self) -> bool:
        return self.text_field is None


SOURCES: dict[str, HubSource] = {
    "c4": HubSource(
        "allenai/c4", None, "train", data_files="en/c4-train.00000-of-01024.json.gz", text_field="text",
        role="task-agnostic calibration (English web text)",
    ),
    "code": HubSource(
        "theblackcat102/evol-codealpaca-v1", None, "train", prompt_field="instruction", response_field="output",
        role="task-specific calibration (code)",
    ),
    "math": HubSource(
        "allenai/tulu-3-sft-personas-math", None, "train", messages_field="messages",
        role="task-specific calibration (math)",
    ),
}

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_SOURCES = ("embedded:mixed", "embedded:literature", "embedded:code", "embedded:math")
STANDIN_PREFIX = "standin:"
STANDIN_SOURCES = tuple(STANDIN_PREFIX + key for key in SOURCES)

SEED_SUFFIX = "@seed"  # "embedded:mixed@seed1": the draw of embedded:mixed with seed 1
DRAW_SUFFIX = "@draw"  # "embedded:literature@draw1of3": draw 1 of 3 disjoint draws of embedded:literature
_DRAW = re.compile(r"^(?P<source>.+)@draw(?P<k>0|[1-9][0-9]*)of(?P<n>[1-9][0-9]*)$")

# Documents kept in the shuffle buffer when streaming a hub source.
SHUFFLE_BUFFER = 10_000


class CalibrationDataUnavailable(RuntimeError):
    """A calibration source cannot be read here (offline, not cached, or hub unreachable)."""


def available_sources() -> list[str]:
    return list(SOURCES) + list(EMBEDDED_SOURCES) + list(STANDIN_SOURCES)


def hub_source(source: str) -> HubSource | None:
    """The `HubSource` whose schema and formatting `source` uses ("c4" and "standin:c4" alike), else None."""
    return SOURCES.get(source.removeprefix(STANDIN_PREFIX))


def calibration_name(source: str, seed: int = 0) -> str:
    """The name of the draw of `source` with `seed`: `source` for seed 0, ``<source>@seed<k>`` otherwise.
    A disjoint draw (``<source>@draw<k>of<n>``) is its own name and takes seed 0 only."""
    if SEED_SUFFIX in source:
        raise ValueError(f"calibration source {source!r} already names a seed; pass the plain source and seed=")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r}: a calibration seed is an integer >= 0")
    if seed and parse_draw(source) is not None:
        raise ValueError(f"calibration source {source!r} is a disjoint draw: it has no seeds (seed={seed}); "
                         f"its siblings are disjoint_draws({parse_draw(source)[0]!r}, {parse_draw(source)[2]})")
    return source if seed == 0 else f"{source}{SEED_SUFFIX}{seed}"


def disjoint_draws(source: str, n: int = 3) -> list[str]:
    """The names of the `n` disjoint draws of `source`: ``["<source>@draw0of<n>", ..., "<source>@draw<n-1>of<n>"]``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r}: the number of disjoint draws is an integer >= 1")
    if SEED_SUFFIX in source or parse_draw(source) is not None:
        raise ValueError(f"calibration source {source!r} already names a draw; pass the plain source")
    return [f"{source}{DRAW_SUFFIX}{k}of{n}" for k in range(n)]


def parse_draw(name: str) -> tuple[str, int, int] | None:
    """``(source, k, n)`` of a disjoint draw's name (``"embedded:code@draw1of3"`` -> ``("embedded:code", 1, 3)``),
    None for any other name; a malformed or out-of-range ``@draw`` suffix raises ValueError."""
    if DRAW_SUFFIX not in name:
        return None
    match = _DRAW.match(name)
    if match is None or int(match["k"]) >= int(match["n"]):
        raise ValueError(f"calibration name {name!r}: a disjoint draw is named <source>{DRAW_SUFFIX}<k>of<n> with 0 <= k < n")
    return match["source"], int(match["k"]), int(match["n"])


def parse_calibration_name(name: str) -> tuple[str, int]:
    """``(source, seed)`` of a draw's name: ``"embedded:mixed@seed2"`` -> ``("embedded:mixed", 2)``,
    ``"embedded:mixed"`` -> ``("embedded:mixed", 0)``; a disjoint draw gives ``(source, k)``:
    ``"embedded:literature@draw2of3"`` -> ``("embedded:literature", 2)``."""
    draw = parse_draw(name)
    if draw is not None:
        return draw[0], draw[1]
    source, suffix, seed = name.partition(SEED_SUFFIX)
    if not suffix:
        return name, 0
    if not seed.isdigit() or int(seed) == 0 or str(int(seed)) != seed:
        raise ValueError(f"calibration name {name!r}: the suffix must be {SEED_SUFFIX}<k> with k > 0 (seed 0 has no suffix)")
    return source, int(seed)


def calibration_name_from_description(description: str) -> str:
    """The draw's name from a `calibration_description` (statistics metadata ``calibration``):
    ``"embedded:mixed (...): 80 x 512 tokens, seed 1"`` -> ``"embedded:mixed@seed1"``. A description
    without one trailing seed (free text, merged statistics) gives its part before `` (``."""
    source = description.split(" (")[0]
    head, sep, seed = description.rpartition(", seed ")
    if sep and seed.strip().isdigit() and " + " not in description:  # one pass, not merged statistics
        return calibration_name(source, int(seed))
    return source


# ---------------------------------------------------------------- documents


def _offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    return any(os.environ.get(k, "").strip().lower() in truthy for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _download_hint(key: str, source: HubSource) -> str:
    files = f", data_files={source.data_files!r}" if source.data_files else ""
    name = f", name={source.name!r}" if source.name else ""
    include = f" --include {source.data_files!r}" if source.data_files else ""
    return (
        f"calibration source {key!r} ({source.path}{', ' + source.data_files if source.data_files else ''}, "
        f"split {source.split!r}) is not available here. On a machine with network, cache it with\n"
        f"  python -c \"from datasets import load_dataset; load_dataset({source.path!r}{name}{files}, split={source.split!r})\"\n"
        f"(or `hf download {source.path} --repo-type dataset{include}`), copy ~/.cache/huggingface to this "
        f"machine and run with HF_DATASETS_OFFLINE=1; or calibrate offline on the embedded corpus: "
        f"{', '.join(EMBEDDED_SOURCES)}."
    )


def _hub_reachable(timeout: float = 2.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    port = urlparse(endpoint).port or 443
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _part(records: Iterator, part: tuple[int, int] | None) -> Iterator:
    """Every n-th record from the k-th (part k of n), or all records (part None)."""
    if part is None:
        yield from records
        return
    k, n = part
    for i, record in enumerate(records):
        if i % n == k:
            yield record


def _hub_documents(key: str, seed: int) -> Iterator[dict]:
    """Records of a hub source, shuffled with `seed`."""
    source = SOURCES[key]
    offline = _offline()
    if not offline and not _hub_reachable():
        raise CalibrationDataUnavailable(_download_hint(key, source) + "\n(the hub did not answer within 2 s)")
    from datasets import load_dataset

    kwargs = dict(name=source.name, split=source.split)
    if source.data_files:
        kwargs["data_files"] = {source.split: source.data_files}
    try:
        if offline:  # only a cached (non-streaming) copy can be read offline
            dataset = load_dataset(source.path, **kwargs).shuffle(seed=seed)
        else:
            dataset = load_dataset(source.path, streaming=True, **kwargs).shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
    except Exception as error:  # datasets raises ConnectionError / FileNotFoundError / ValueError offline
        raise CalibrationDataUnavailable(f"{_download_hint(key, source)}\n(datasets said: {error})") from error
    yield from dataset


def _standin_documents(key: str, seed: int) -> Iterator[dict]:
    """The stand-in records of hub source `key`, shuffled with `seed` (the hub schema, a few rows)."""
    from .standin import calibration_standin

    records = calibration_standin(key)
    random.Random(seed).shuffle(records)
    yield from records


def _embedded_documents(key: str, seed: int, split: str = "calibration", part: tuple[int, int] | None = None) -> Iterator[str]:
    """Documents of one split of the embedded corpus, shuffled; "mixed" interleaves domains.
    part (k, n): only part k of n of each domain's documents (a fixed partition, `disjoint_draws`)."""
    from ..testbed.corpus import DOMAINS, read_split

    domain = key[len(EMBEDDED_PREFIX):]
    if domain != "mixed" and domain not in DOMAINS:
        raise ValueError(f"unknown embedded calibration source {key!r}; known: {', '.join(EMBEDDED_SOURCES)}")
    domains = DOMAINS if domain == "mixed" else (domain,)
    per_domain = []
    for d in domains:
        documents = read_split(d, split)
        if part is not None:  # one fixed shuffle per domain and split, whatever the draw: parts never overlap
            k, n = part
            random.Random(f"parts-{d}-{split}").shuffle(documents)
            documents = documents[k::n]
        else:
            random.Random(f"{seed}-{d}" if split == "calibration" else f"{seed}-{d}-{split}").shuffle(documents)
        per_domain.append(documents)
    # round-robin: equal shares of documents from each domain while all last
    for i in range(max(len(docs) for docs in per_domain)):
        for docs in per_domain:
            if i < len(docs):
                yield docs[i]


def format_record(record: dict, source: HubSource, tokenizer) -> str:
    """One record as text: plain text, or chat turns through the tokenizer's chat template."""
    if source.text_field is not None:
        return record[source.text_field]
    if source.messages_field is not None:
        messages = [{"role": m["role"], "content": m["content"]} for m in record[source.messages_field]]
    else:
        messages = [
            {"role": "user", "content": record[source.prompt_field]},
            {"role": "assistant", "content": record[source.response_field]},
        ]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n\n".join(m["content"] for m in messages)


def calibration_texts(source: str, tokenizer=None, *, seed: int = 0, split: str = "calibration") -> Iterator[str]:
    """The documents of `source` as text, in a seeded random order (chat records formatted).

    split: for embedded sources, the corpus split to read (``"test"`` for held-out data).
    A disjoint draw (``<source>@draw<k>of<n>``) reads part k of n of the source's documents in
    one fixed order (seed 0 only): embedded splits are partitioned per domain, hub and stand-in
    records by their position in the seed-0 shuffle.
    """
    draw = parse_draw(source)
    part = None
    if draw is not None:
        if seed:
            raise ValueError(f"calibration source {source!r} is a disjoint draw: it has no seeds (seed={seed})")
        source, part = draw[0], (draw[1], draw[2])
    if source.startswith(EMBEDDED_PREFIX):
        yield from _embedded_documents(source, seed, split, part)
        return
    if split != "calibration":
        raise ValueError(f"split={split!r}: only embedded sources have splits; {source!r} is a hub source")
    hub = hub_source(source)
    if hub is None:
        raise ValueError(f"unknown calibration source {source!r}; known: {', '.join(available_sources())}")
    key = source.removeprefix(STANDIN_PREFIX)
    records = _standin_documents(key, seed) if source.startswith(STANDIN_PREFIX) else _hub_documents(key, seed)
    for record in _part(records, part):  # only where records come from differs; formatting is the source's
        yield format_record(record, hub, tokenizer)


# ---------------------------------------------------------------- packing


def calibration_sequences(source: str, tokenizer, *, n_sequences: int, seq_len: int, seed: int = 0, strict: bool = True,
                          split: str = "calibration") -> torch.Tensor:
    """`n_sequences` packed windows of `seq_len` tokens of `source`, int64 ``[n_sequences, seq_len]``.

    Documents (shuffled with `seed`) are tokenised without special tokens, each followed by
    the tokenizer's end-of-sequence token (chat-formatted text keeps what its template adds),
    concatenated, and cut into consecutive windows. If the source runs out first: raises
    ValueError when `strict`, else returns the windows it could fill.
    """
    if n_sequences < 1 or seq_len < 1:
        raise ValueError("n_sequences and seq_len must be positive")
    eos = tokenizer.eos_token_id
    hub = hub_source(_plain(source))
    chat = hub is not None and hub.chat and bool(getattr(tokenizer, "chat_template", None))
    sequences = torch.empty(n_sequences, seq_len, dtype=torch.long)
    buffer: list[int] = []
    produced = 0
    for text in calibration_texts(source, tokenizer, seed=seed, split=split):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # long documents are fine: they are cut
        buffer.extend(ids + [eos] if eos is not None and not chat else ids)
        while len(buffer) >= seq_len and produced < n_sequences:
            sequences[produced] = torch.tensor(buffer[:seq_len])
            del buffer[:seq_len]
            produced += 1
        if produced == n_sequences:
            break
    if produced < n_sequences:
        if strict:
            raise ValueError(
                f"calibration source {source!r} holds only {produced} sequences of {seq_len} tokens, "
                f"fewer than n_sequences={n_sequences}; lower n_sequences or seq_len, or pass strict=False"
            )
        sequences = sequences[:produced]
    return sequences


def calibration_batches(
    source: str,
    tokenizer,
    *,
    n_sequences: int,
    seq_len: int,
    seed: int = 0,
    batch_size: int = 8,
    strict: bool = True,
    split: str = "calibration",
) -> Iterator[dict]:
    """Packed calibration sequences of `source` (see `calibration_sequences`), `batch_size` at a time.

    Yields dicts with ``input_ids`` and ``attention_mask`` (all ones: packed windows hold no
    padding), both ``[B, seq_len]`` int64, ready for `collect_statistics`. All sequences are
    read before the first batch is yielded, so a short or missing source fails before any
    model work. Hub sources that cannot be read raise `CalibrationDataUnavailable`
    (offline: within about 2 s, naming what to download and how). `split` (embedded sources
    only) reads another corpus split, e.g. ``"test"`` for held-out evaluation windows.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    sequences = calibration_sequences(source, tokenizer, n_sequences=n_sequences, seq_len=seq_len, seed=seed, strict=strict,
                                      split=split)
    for start in range(0, sequences.shape[0], batch_size):
        input_ids = sequences[start : start + batch_size]  # (B, T)
        yield {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _plain(source: str) -> str:
    """`source` without a disjoint draw's suffix."""
    draw = parse_draw(source)
    return source if draw is None else draw[0]


def calibration_description(source: str, *, n_sequences: int, seq_len: int, seed: int) -> str:
    """A one-line description for `collect_statistics(calibration=...)` and result provenance."""
    hub = hub_source(_plain(source))
    if source.startswith(STANDIN_PREFIX) and hub is not None:
        where = f"stand-in rows in the schema of {hub.path}"
    else:
        where = hub.path if hub is not None else "moepaper embedded corpus, calibration split"
    return f"{source} ({where}): {n_sequences} x {seq_len} tokens, seed {seed}"
