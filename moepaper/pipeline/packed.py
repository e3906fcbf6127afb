"""lm-eval's HFLM with shared contexts scored once: the same requests, fewer tokens through the model.

A four-way multiple-choice item is four loglikelihood requests with one context. Stock HFLM feeds
the model four rows, ``context + choice[:-1]``, so the context goes through the model four times,
and it projects every position onto the vocabulary although only the choice's positions are scored.
Held-out perplexity (``loglikelihood_rolling``) is batched eight windows at a time in document
order, so short windows are padded to long ones.

`PackedHFLM` changes only how the model is called:

- requests with the same context become ONE packed row, ``context + branch_1 + branch_2 + ...``
  (branch k = choice k without its last token, identical branches stored once), with a tree
  attention mask: context tokens see the context causally, a branch token sees the context and
  its own branch up to itself, never another branch; each branch continues the context's
  position ids. Every scored position therefore sees exactly the tokens it sees in the stock row;
- only the scored positions reach the language-model head (the model's own ``logits_to_keep``);
- the rows of one call (every request of an evaluation, rolling windows of all documents
  included) are sorted by length and batched up to a token budget, so padding is small.

What stays lm-eval's: the tasks, prompts, tokenisation, requests (windows built by lm-eval's own
``get_rolling_token_windows``), the log-softmax dtype, the greedy check, the sums, the cache hook
and the metrics. Per-item accuracies equal the stock path's; loglikelihoods equal it to float
rounding (the matrix shapes differ, so the last bits of a sum can), measured by
``tests/pipeline/test_evaluation.py`` against the stock ``lm_eval`` command line and by
``benchmarks/evaluation.py`` on the full local suite.

Used for in-memory causal models with the ``sdpa`` or ``eager`` attention of transformers and a
``logits_to_keep`` argument; anything else (a seq2seq model, another attention kernel, an automatic
batch size, a request longer than the model's window) goes through stock HFLM unchanged.

Sliding-window (or chunked) attention layers: transformers uses a 4-D mask as given, so the tree
mask would let such a layer see the whole row. A call is packed only when no request is longer
than the model's attention window (`attention_window`), where the window hides nothing and the
stock mask is the causal one; otherwise the whole call goes through stock HFLM.

Padding: packed rows are padded with token id 0, as stock lm-eval pads, never with the tokenizer's
pad id (which may lie beyond the embedding); padding is never attended to by a scored position.
"""

from __future__ import annotations

import inspect
import os

import torch
import torch.nn.functional as F

try:  # lm-eval is a dependency of the pipeline, not of the core library
    from lm_eval.models.huggingface import HFLM
except ImportError:  # pragma: no cover - the pipeline needs lm-eval
    HFLM = object

SUPPORTED_ATTENTION = ("sdpa", "eager")
# Tokens per model call on CPU: a fused MoE layer copies every token's hidden state once per routed
# expert (top-k rows), and past about a thousand tokens those copies leave the cache. On the 2-core
# machine the full local suite took 28.3 / 24.5 / 27.8 s at 512 / 1024 / 2048 (embedded model, 2 threads).
CPU_TOKEN_BUDGET = 1024


def attention_window(config) -> int | None:
    """The shortest attention window of any layer of a model with `config`: ``sliding_window`` (or
    ``attention_chunk_size``) when a layer uses it, None when every layer attends to the whole context.

    Layers are read from ``layer_types`` where the config has it (gpt-oss, Qwen2-MoE: a window only
    when some layer type is a sliding or chunked one); without it, a set ``sliding_window`` is taken to
    apply to every layer (Mixtral, Phi-MoE, Qwen3-MoE). A config of several sub-configs (``text_config``)
    is read through it."""
    config = getattr(config, "text_config", None) or config
    windows = [getattr(config, key, None) for key in ("sliding_window", "attention_chunk_size")]
    windows = [int(w) for w in windows if w is not None and not isinstance(w, bool)]
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and not any(("sliding" in str(t) or "chunk" in str(t)) for t in layer_types):
        return None
    if layer_types is not None and not windows:
        return 0  # a windowed layer of unknown window: never packed
    return min(windows) if windows else None


class _Tree:
    """One packed row: a shared context and the branches of the requests that continue it."""

    __slots__ = ("tokens", "positions", "branch", "requests")

    def __init__(self, context: list[int]):
        self.tokens = list(context)
        self.positions = list(range(len(context)))
        self.branch = [0] * len(context)  # 0: the context; k: branch k
        self.requests: list[tuple[int, list[int], list[int]]] = []  # (request index, scored row positions, targets)

    def add(self, index: int, continuation: list[int], starts: dict) -> None:
        context_len = self.branch.count(0)
        body = tuple(continuation[:-1])
        if body not in starts:  # a new branch
            starts[body] = len(self.tokens)
            branch = max(self.branch) + 1
            self.tokens += body
            self.positions += range(context_len, context_len + len(body))
            self.branch += [branch] * len(body)
        start = starts[body]
        scored = [context_len - 1] + list(range(start, start + len(body)))
        self.requests.append((index, scored, list(continuation)))

    def __len__(self) -> int:
        return len(self.tokens)

    def mask(self) -> torch.Tensor:
        """(n, n) bool: query q sees key k iff k <= q and k is context or on q's branch."""
        n = len(self.tokens)
        branch = torch.tensor(self.branch)
        index = torch.arange(n)
        causal = index[None, :] <= index[:, None]
        return causal & ((branch[None, :] == 0) | (branch[None, :] == branch[:, None]))


class PackedHFLM(HFLM):
    """`lm_eval.models.huggingface.HFLM` scoring loglikelihood requests in packed, sorted rows (module docstring).

    token_budget: at most this many tokens (rows × longest row) per model call; default
        `CPU_TOKEN_BUDGET` on CPU, else ``batch_size × max_length`` (the largest call stock HFLM
        makes with that batch size); the environment variable ``MOEPAPER_TOKEN_BUDGET`` overrides the default.
    """

    def __init__(self, *args, token_budget: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_budget = token_budget
        self.packed_calls = 0  # model calls made by the packed path (benchmarks read it)

    # ------------------------------------------------------------------ when the packed path applies

    def packable(self, requests) -> bool:
        model = getattr(self, "_model", None)
        if self.backend != "causal" or not isinstance(self.batch_size, int) or model is None:
            return False
        if getattr(model.config, "_attn_implementation", None) not in SUPPORTED_ATTENTION:
            return False
        if "logits_to_keep" not in inspect.signature(model.forward).parameters:
            return False
        # a request's row is len(c) + len(t) - 1 tokens; within a window that long, the window hides nothing
        window = attention_window(model.config)
        limit = self.max_length if window is None else min(self.max_length, window)
        return all(0 < len(c) and 0 < len(t) and len(c) + len(t) - 1 <= limit for _, c, t in requests)

    # ------------------------------------------------------------------ lm-eval's entry points

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """As HFLM: lm-eval's rolling windows of each document, summed per document; the windows of
        all documents are scored in one `_loglikelihood_tokens` call (sorted rows) instead of eight at a time."""
        from lm_eval import utils

        if self.batch_size == "auto" or self.world_size > 1:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        windows, counts = [], []
        for (string,) in (req.args for req in requests):
            rolling = list(map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)))
            windows += [(None,) + window for window in rolling]
            counts.append(len(rolling))
        if not self.packable(windows):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals, at = [], 0
        for req, count in zip(requests, counts, strict=True):
            total = sum(score for score, _ in scores[at : at + count])  # window order, as HFLM sums
            at += count
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if not self.packable(requests):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        from tqdm import tqdm

        trees = self._trees(requests)
        trees.sort(key=lambda t: -len(t))  # longest first, as HFLM orders rows
        budget = self.token_budget or int(os.environ.get("MOEPAPER_TOKEN_BUDGET", 0)) or (
            CPU_TOKEN_BUDGET if self.device.type == "cpu" else self.batch_size * self.max_length)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests")
        start = 0
        while start < len(trees):
            longest, stop = len(trees[start]), start + 1
            while stop < len(trees) and (stop - start + 1) * longest <= budget:
                stop += 1
            batch = trees[start:stop]
            for index, answer in self._score(batch):
                results[index] = answer
                request_str = requests[index][0]
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
                bar.update(1)
            start = stop
        bar.close()
        return results

    # ------------------------------------------------------------------ packing and scoring

    def _trees(self, requests) -> list[_Tree]:
        """Requests grouped by context; a tree whose row would pass the model's window starts another."""
        trees, open_tree = [], {}
        for index, (_, context, continuation) in enumerate(requests):
            key = tuple(context)
            tree, starts = open_tree.get(key, (None, None))
            grows = tree is not None and tuple(continuation[:-1]) not in starts
            if tree is None or (grows and len(tree) + len(continuation) - 1 > self.max_length):
                tree, starts = _Tree(context), {}
                open_tree[key] = (tree, starts)
                trees.append(tree)
            tree.add(index, continuation, starts)
        return trees

    def _attention_mask(self, masks: list[torch.Tensor], length: int, dtype: torch.dtype) -> torch.Tensor:
        allowed = torch.zeros(len(masks), 1, length, length, dtype=torch.bool)
        for row, mask in enumerate(masks):
            n = mask.shape[0]
            allowed[row, 0, :n, :n] = mask
            allowed[row, 0, range(n, length), range(n, length)] = True  # padding sees itself: no empty softmax
        if self._model.config._attn_implementation == "sdpa":
            return allowed.to(self.device)
        additive = torch.zeros(allowed.shape, dtype=dtype)
        return additive.masked_fill_(~allowed, torch.finfo(dtype).min).to(self.device)

    def _score(self, batch: list[_Tree]):
        """(request index, (loglikelihood, is greedy)) for every request of the trees in `batch`."""
        length = len(batch[0])
        keep_count = max(sum(len(scored) for _, scored, _ in tree.requests) for tree in batch)
        ids = torch.zeros((len(batch), length), dtype=torch.long)  # padding: id 0, as stock lm-eval pads
        positions = torch.zeros((len(batch), length), dtype=torch.long)
        keep = torch.zeros((len(batch), keep_count), dtype=torch.long)  # scored row positions (padded with 0)
        slots = []  # per request: (batch row, first slot in `keep`, targets)
        for row, tree in enumerate(batch):
            ids[row, : len(tree)] = torch.tensor(tree.tokens)
            positions[row, : len(tree)] = torch.tensor(tree.positions)
            slot = 0
            for index, scored, targets in tree.requests:
                keep[row, slot : slot + len(scored)] = torch.tensor(scored)
                slots.append((index, row, slot, targets))
                slot += len(scored)
        dtype = next(self._model.parameters()).dtype
        mask = self._attention_mask([tree.mask() for tree in batch], length, dtype)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            logits = self._model(input_ids=ids.to(self.device), attention_mask=mask,
                                 position_ids=positions.to(self.device), logits_to_keep=keep.to(self.device),
                                 use_cache=False).logits
        self.packed_calls += 1
        logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)  # [rows, kept positions, vocab]
        targets = torch.zeros(keep.shape, dtype=torch.long)
        for index, row, slot, tokens in slots:
            targets[row, slot : slot + len(tokens)] = torch.tensor(tokens)
        targets = targets.to(logprobs.device)
        chosen = torch.gather(logprobs, 2, targets.unsqueeze(-1)).squeeze(-1)  # [rows, kept]: log p(target)
        hits = (logprobs.argmax(dim=-1) == targets).cpu()
        chosen = chosen.cpu()
        for index, row, slot, tokens in slots:
            end = slot + len(tokens)  # HFLM sums the same values in the same order
            yield index, (float(chosen[row, slot:end].sum()), bool(hits[row, slot:end].all()))


__all__ = ["CPU_TOKEN_BUDGET", "PackedHFLM", "SUPPORTED_ATTENTION", "attention_window"]
