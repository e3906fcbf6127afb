"""Evaluate pruned models from checkpoints on disk: the sweep's vLLM backend.

vLLM loads weights itself and cannot see `mask_experts`, so ``sweep(..., backend="vllm")``
evaluates each (criterion, ratio) from a structurally pruned checkpoint:

    prune the in-memory model in place (`pruned_in_place`) -> save_pruned(model, tokenizer, path, keep) -> restore it
    -> lm-eval's vLLM backend on `path` (pretrained=path, max_model_len=4096, dtype bfloat16, seed,
       the base checkpoint's tokenizer when there is one)
    -> delete `path` (unless ``keep_checkpoints=True``)

The unpruned model is evaluated from the base checkpoint itself when one is known
(``base_checkpoint``: a local folder or a Hub id), otherwise from a save of the in-memory
model (deleted afterwards like the others). `plan_checkpoints` lists what a sweep would save
and the lm-eval arguments it would pass, without running anything; the sweep builds every
step with the same `CheckpointEvaluator.run`, so the plan is what executes (minus the entries
a resumed sweep finds already done on disk, and those whose kept experts equal an entry
already evaluated).

Memory: a pruned checkpoint is written from the in-memory model itself, pruned in place
without copying its weights and restored exactly after the save (`pruned_in_place`), so the
model never sits twice in memory (peak: one model plus the largest expert tensor plus a
shard being written; tests/pipeline/test_vllm_plan.py measures it). ``base_checkpoint`` is
checked against the in-memory model tensor by tensor from its files. Load the model on the
CPU for this backend (``device_map=None``): every GPU byte it holds is one vLLM cannot use.

Each checkpoint is evaluated in a fresh Python process by default (``isolate=True``,
`evaluate_in_subprocess`): a vLLM engine does not reliably give its GPU memory back inside
the process that made it, so a second engine in the same process can run out of memory.
The child runs ``moepaper.pipeline.evaluation.evaluate(path, None, suite, backend="vllm",
model_args=...)`` and hands back its rows as JSON.

This module uses the core and `evaluation`; `results.sweep` uses it (not the reverse).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..architecture import find_moe_layers
from ..criteria import expert_scores, resolve_criteria
from ..pruning import _normalise_keep, prune_experts, save_pruned, select_experts
from ..statistics import ExpertStatistics
import moepaper.pipeline.evaluation as evaluation  # the module (tests replace its evaluate), not the package
from .keys import NO_CALIBRATION, UNPRUNED, entry_folder

log = logging.getLogger(__name__)


# The paper's serving settings (docs/paper_protocol.md): a 4096-token context, bf16 weights.
VLLM_DEFAULTS = {
    "tensor_parallel_size": 1,
    "gpu_memory_utilization": 0.85,
    "max_model_len": 4096,
    "dtype": "bfloat16",
}

# save_pretrained's shard size for pruned checkpoints: safetensors writes a shard at a time, so a
# smaller shard keeps the save's transient memory small next to the model.
SHARD_SIZE = "2GB"

SUITES_BY_NAME = ("paper", "paper-rehearsal", "local", "smoke")  # suites a child process can rebuild from their name


def vllm_model_args(checkpoint: str | Path, *, seed: int = 0, **overrides) -> dict:
    """lm-eval's vLLM model arguments for one checkpoint: ``pretrained`` plus `VLLM_DEFAULTS`,
    ``seed`` and any `overrides` (other `lm_eval.models.vllm_causallms.VLLM` keywords)."""
    return {"pretrained": str(checkpoint), **VLLM_DEFAULTS, "seed": int(seed), **overrides}


def checkpoint_folder(checkpoint_dir: str | Path, model_name: str, calibration: str, criterion, removed) -> Path:
    """Where the checkpoint of one sweep entry is saved: ``<dir>/<model>/<calibration>/<criterion key>__removed<n>``,
    the same key as its result files (`moepaper.pipeline.keys`)."""
    return Path(checkpoint_dir) / entry_folder(model_name, calibration, criterion, removed)


@dataclass(frozen=True)
class CheckpointRun:
    """One evaluation of the vLLM backend: which checkpoint, with which lm-eval arguments.

    name: the criterion's name, or ``"unpruned"``.
    saved: True when the sweep writes this checkpoint (and deletes it afterwards unless kept);
        False for the unpruned model evaluated from the base checkpoint as it is.
    model_args: what lm-eval's vLLM backend receives (``pretrained`` is `checkpoint`).
    experts_kept: experts per MoE layer in the checkpoint.
    """

    name: str
    ratio: float
    calibration: str
    checkpoint: str
    saved: bool
    model_args: dict = field(hash=False, compare=False)
    experts_kept: tuple[int, ...] = ()


def _base_from_model(model) -> str | None:
    """The folder the in-memory model was loaded from, when it is a local checkpoint."""
    name = str(getattr(model.config, "_name_or_path", "") or "")
    return name if name and (Path(name) / "config.json").is_file() else None


@contextmanager
def pruned_in_place(model, keep):
    """`model` pruned to `keep` for the duration of the block, without a second copy of its
    weights, and restored exactly afterwards (also on error).

    Every per-expert tensor is permuted in place so the kept experts come first in ascending
    order (one tensor's temporary at a time), then `prune_experts(views=True)` slices those
    prefixes as views: the pruned model is what ``prune_experts(copy, keep)`` gives, bit for
    bit, while memory stays one model plus the largest expert tensor. On exit the modules'
    tensors, expert counts and config are put back and the permutation undone.
    """
    layers = find_moe_layers(model)
    keep = _normalise_keep(layers, keep)  # checks the real selection (router groups included) before anything moves
    modules = list(model.modules())
    saved = [(m, {k: v for k, v in vars(m).items() if not k.startswith("_")}, dict(m._parameters), dict(m._buffers))
             for m in modules]
    config_state = copy.deepcopy(model.config.__dict__)
    counts = [layer.num_experts for layer in layers]  # find_moe_layers' cached entries, which prune_experts updates
    permuted: list[tuple[torch.Tensor, int, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer, kept in zip(layers, keep):
                removed = torch.tensor([e for e in range(layer.num_experts) if e not in set(kept.tolist())], dtype=torch.long)
                order = torch.cat([kept, removed])
                for t in layer.per_expert_tensors:
                    tensor = t.tensor
                    tensor.copy_(tensor.index_select(t.dim, order.to(tensor.device)))
                    permuted.append((tensor, t.dim, order))
        prune_experts(model, [torch.arange(len(k)) for k in keep], views=True)
        yield model
    finally:
        for module, attributes, parameters, buffers in saved:
            vars(module).update(attributes)
            module._parameters.clear()
            module._parameters.update(parameters)
            module._buffers.clear()
            module._buffers.update(buffers)
        model.config.__dict__.clear()
        model.config.__dict__.update(config_state)
        for layer, count in zip(layers, counts):
            layer.num_experts = count
        with torch.no_grad():
            for tensor, dim, order in reversed(permuted):
                tensor.copy_(tensor.index_select(dim, torch.argsort(order).to(tensor.device)))


def _checkpoint_files(checkpoint: str) -> list[Path]:
    """The safetensors files of a local folder or a Hub id (the Hub's through its cache)."""
    folder = Path(checkpoint)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(checkpoint, allow_patterns=["*.safetensors", "*.json"]))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"base_checkpoint {checkpoint!r} holds no *.safetensors files")
    return files


def _different_from_checkpoint(model, checkpoint: str, samples: int = 64) -> str | None:
    """The first tensor of `model` whose strided sample differs from the same-named tensor of
    `checkpoint` (read one at a time, cast to the model tensor's dtype); None if all agree.

    Compares the tensors whose names and shapes are the same in memory and on disk (embeddings,
    attention, norms, routers; fused experts are stored per expert and skipped); a checkpoint
    sharing none of them is different as a whole.
    """
    from safetensors import safe_open

    state = dict(model.named_parameters()) | dict(model.named_buffers())
    compared = 0
    for file in _checkpoint_files(checkpoint):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensor = state.get(name)
                if tensor is None:
                    continue
                stored = handle.get_slice(name)
                if tuple(stored.get_shape()) != tuple(tensor.shape):
                    return name
                stored = handle.get_tensor(name).to(tensor.dtype)
                step = max(1, tensor.numel() // samples)
                if not torch.equal(tensor.detach().reshape(-1)[::step][:samples].cpu(), stored.reshape(-1)[::step][:samples]):
                    return name
                compared += 1
    return None if compared else f"no tensor of the model is named as in {checkpoint!r}"


def _gpu_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cuda")


class CheckpointEvaluator:
    """Save a pruned checkpoint per sweep entry, evaluate it from disk, delete it.

    model, tokenizer: the base model (in memory; load it on the CPU) and its tokenizer,
        saved into every checkpoint.
    checkpoint_dir: where checkpoints are written (`checkpoint_folder` below it).
    model_name: the model's name in checkpoint folders (default: ``config._name_or_path``'s last part).
    base_checkpoint: the base model's folder or Hub id: the unpruned model is evaluated from
        it (checked once against the in-memory weights), and its tokenizer files serve every
        entry. None: the folder the model was loaded from when that is a local checkpoint, else
        a save of the unpruned model.
    keep_checkpoints: keep every saved checkpoint (default: delete each after its evaluation).
    batch_size: lm-eval's batch size for this backend, replacing the sweep's: ``"auto"`` (default)
        hands vLLM every request at once, so its continuous batching runs full; None keeps the sweep's.
    seed: vLLM's seed (greedy decoding does not sample; the seed only fixes vLLM's own state).
    python: the interpreter of the evaluation child process (default: this one), e.g. a
        separate vLLM environment's ``.venv-vllm/bin/python``; it imports this moepaper from
        its source folder and needs lm-eval, vLLM, transformers, pandas there (docs/vllm.md).
    evaluate_checkpoint: ``fn(path, model_args, **evaluate_kwargs) -> DataFrame`` of
        `evaluation.RESULT_COLUMNS` rows; default `evaluate_in_subprocess` (``isolate=True``)
        or `evaluate_in_process`.
    **vllm_args: overrides of `VLLM_DEFAULTS` and other lm-eval vLLM arguments
        (``tensor_parallel_size=2``, ``gpu_memory_utilization=0.9``, ...).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        checkpoint_dir: str | Path,
        model_name: str | None = None,
        base_checkpoint: str | Path | None = None,
        keep_checkpoints: bool = False,
        seed: int = 0,
        evaluate_checkpoint: Callable[..., pd.DataFrame] | None = None,
        isolate: bool = True,
        python: str | Path | None = None,
        batch_size: int | str | None = "auto",
        **vllm_args,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.checkpoint_dir = Path(checkpoint_dir)
        self.model_name = model_name or Path(str(getattr(model.config, "_name_or_path", "") or type(model).__name__)).name
        self.base_checkpoint = str(base_checkpoint) if base_checkpoint is not None else _base_from_model(model)
        self.keep_checkpoints = keep_checkpoints
        self.seed = seed
        self.batch_size = batch_size
        self.vllm_args = vllm_args
        if evaluate_checkpoint is None and isolate:
            evaluate_checkpoint = functools.partial(evaluate_in_subprocess, python=python)
        elif python is not None:
            raise ValueError("python= names the child process's interpreter: it needs isolate=True and no evaluate_checkpoint")
        self.evaluate_checkpoint = evaluate_checkpoint or evaluate_in_process
        self._base_checked = False
        self.layers = find_moe_layers(model)
        if _gpu_bytes(model):
            log.warning("the in-memory model holds %.1f GiB of GPU memory that vLLM cannot use; for backend='vllm' "
                        "load it on the CPU (device_map=None)", _gpu_bytes(model) / 2**30)

    def run(self, criterion, ratio: float, calibration: str, keep) -> CheckpointRun:
        """The checkpoint and lm-eval arguments of one entry (`criterion` ``"unpruned"`` and `keep` None: the unpruned model)."""
        name = criterion if isinstance(criterion, str) else criterion.name
        removed = [0] * len(self.layers) if keep is None else [l.num_experts - len(k) for l, k in zip(self.layers, keep)]
        if keep is None and self.base_checkpoint is not None:
            path, saved = self.base_checkpoint, False
        else:
            path, saved = str(checkpoint_folder(self.checkpoint_dir, self.model_name, calibration, criterion, removed)), True
        kept = tuple(l.num_experts for l in self.layers) if keep is None else tuple(len(k) for k in keep)
        # One tokenizer for every entry: the base checkpoint's files when the unpruned model is read from
        # there (a re-saved tokenizer can differ from the hub's: other files, another backend for ERNIE),
        # else each checkpoint's own, all saved from the same tokenizer object.
        tokenizer = {"tokenizer": self.base_checkpoint} if self.base_checkpoint is not None else {}
        return CheckpointRun(name, float(ratio), calibration, path, saved,
                             vllm_model_args(path, seed=self.seed, **{**tokenizer, **self.vllm_args}), kept)

    def check_base(self) -> None:
        """Check once that `base_checkpoint` holds the in-memory model's weights (results are keyed by
        the in-memory model, and the unpruned entry is evaluated from the base as it is), reading
        the checkpoint's tensors one at a time (`_different_from_checkpoint`): never a second model."""
        different = _different_from_checkpoint(self.model, self.base_checkpoint)
        if different:
            raise ValueError(
                f"base_checkpoint {self.base_checkpoint!r} is not the in-memory model (first difference: {different}); "
                "pass the checkpoint the model was loaded from"
            )
        self._base_checked = True

    def save(self, run: CheckpointRun, keep) -> Path:
        """Write the checkpoint of `run`: the pruned copy (or the unpruned model) with its tokenizer and provenance."""
        path = Path(run.checkpoint)
        if path.exists():
            shutil.rmtree(path)  # a leftover of an interrupted run: never evaluate a half-written checkpoint
        extra = {"sweep_entry": {"criterion": run.name, "ratio": run.ratio, "calibration": run.calibration}}
        if keep is None:
            everything = [list(range(layer.num_experts)) for layer in self.layers]
            return save_pruned(self.model, self.tokenizer, path, everything, extra=extra)
        if self.base_checkpoint is not None and not self._base_checked:
            self.check_base()
        with pruned_in_place(self.model, keep) as pruned:  # never a second copy of the model in memory
            return save_pruned(pruned, self.tokenizer, path, keep, extra=extra, max_shard_size=SHARD_SIZE)

    def evaluate(self, run: CheckpointRun, keep, **evaluate_kwargs) -> pd.DataFrame:
        """Save `run`'s checkpoint (when it is saved), evaluate it, delete it unless kept (also on error)."""
        if self.batch_size is not None:
            evaluate_kwargs["batch_size"] = self.batch_size
        if run.saved:
            self.save(run, keep)
        elif not self._base_checked:  # the base is evaluated as it is: check once that it is the in-memory model
            self.check_base()
        try:
            return self.evaluate_checkpoint(run.checkpoint, dict(run.model_args), **evaluate_kwargs)
        finally:
            if run.saved and not self.keep_checkpoints:
                shutil.rmtree(run.checkpoint, ignore_errors=True)

    def provenance(self, run: CheckpointRun) -> dict:
        """What a result record says about the checkpoint it came from."""
        args = {k: v for k, v in run.model_args.items() if k != "pretrained"}
        return {"checkpoint": run.checkpoint, "checkpoint_kept": (not run.saved) or self.keep_checkpoints, "vllm": args}


def plan_checkpoints(
    model,
    stats: ExpertStatistics,
    *,
    criteria: str | Sequence | None = None,
    ratios: Sequence[float] = (0.25, 0.5),
    calibration: str | None = None,
    checkpoint_dir: str | Path,
    model_name: str | None = None,
    base_checkpoint: str | Path | None = None,
    include_unpruned: bool = True,
    seed: int = 0,
    **vllm_args,
) -> list[CheckpointRun]:
    """What ``sweep(..., backend="vllm")`` would save and evaluate, without running anything.

    One `CheckpointRun` per entry, in the sweep's order: the unpruned model, then every
    criterion at every ratio, with the checkpoint folder and lm-eval's vLLM arguments. The
    arguments are the sweep's (``checkpoint_dir``, ``base_checkpoint``, ``seed`` and vLLM
    overrides as in ``sweep(checkpoints={...})``). A resumed sweep skips entries already on
    disk and copies results of entries whose kept experts equal one already evaluated.
    """
    vllm_args.pop("python", None)  # the child's interpreter: nothing a plan runs
    evaluator = CheckpointEvaluator(model, None, checkpoint_dir=checkpoint_dir, model_name=model_name,
                                    base_checkpoint=base_checkpoint, seed=seed, evaluate_checkpoint=_not_run, **vllm_args)
    calibration = calibration or stats.metadata.get("calibration") or "unknown"
    runs = [evaluator.run(UNPRUNED, 0.0, NO_CALIBRATION, None)] if include_unpruned else []
    for criterion in resolve_criteria(criteria):
        if criterion.replacement != "reroute":
            raise NotImplementedError(
                f"criterion {criterion.name!r} replaces pruned experts by novices (a constant output, routing "
                "unchanged), which a stock pruned checkpoint cannot express: plan without it"
            )
        for ratio in ratios:
            keep = select_experts(expert_scores(stats, criterion, model=model), ratio=float(ratio), layers=evaluator.layers)
            runs.append(evaluator.run(criterion, ratio, calibration, keep))
    return runs


def _not_run(*args, **kwargs):  # pragma: no cover - a plan never evaluates
    raise RuntimeError("a plan does not evaluate")


def evaluate_in_process(checkpoint: str | Path, model_args: dict, *, suite="paper", backend: str = "vllm",
                        **evaluate_kwargs) -> pd.DataFrame:
    """``evaluation.evaluate(checkpoint, None, suite, backend="vllm", model_args=model_args, ...)`` in this process."""
    args = {k: v for k, v in model_args.items() if k != "pretrained"} if backend == "vllm" else None
    return evaluation.evaluate(str(checkpoint), None, suite, backend=backend, model_args=args, **evaluate_kwargs)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGKILL when the process that started it dies (killed or not), so no
    evaluation child, and no vLLM engine inside it, outlives the sweep."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_child(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run` of an evaluation child that dies with this process (`_die_with_parent`, Linux)."""
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    return subprocess.run(command, preexec_fn=preexec, check=False, **kwargs)


def evaluate_in_subprocess(checkpoint: str | Path, model_args: dict, *, suite="paper", backend: str = "vllm",
                           python: str | Path | None = None, **evaluate_kwargs) -> pd.DataFrame:
    """`evaluate_in_process` in a fresh Python process (``python -m moepaper.pipeline.checkpoints``),
    so each vLLM engine's GPU memory is released when its checkpoint is done.

    The suite goes by name (``paper``, ``paper-rehearsal``, ``local``, ``smoke``); the child's output (vLLM and
    lm-eval logs) goes to this process's stdout and stderr. A child that fails raises
    RuntimeError here. `python`: the child's interpreter (default: this one), e.g. a separate
    vLLM environment; the child is killed if this process dies (`run_child`).
    """
    suite_name = suite if isinstance(suite, str) else suite.name
    if suite_name not in SUITES_BY_NAME or evaluation.get_suite(suite_name) != evaluation.get_suite(suite):
        raise ValueError(f"suite {suite_name!r} cannot be rebuilt by name in a child process; "
                         "use a named suite or CheckpointEvaluator(isolate=False)")
    request = {"checkpoint": str(checkpoint), "model_args": model_args, "suite": suite_name, "backend": backend,
               "evaluate": evaluate_kwargs}
    with tempfile.TemporaryDirectory(prefix="moepaper-eval-") as folder:
        request_path, output_path = Path(folder) / "request.json", Path(folder) / "rows.json"
        request_path.write_text(json.dumps(request))
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # this moepaper, not another install
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        done = run_child([str(python or sys.executable), "-m", "moepaper.pipeline.checkpoints", str(request_path),
                          str(output_path)], env=env)
        if done.returncode != 0 or not output_path.exists():
            raise RuntimeError(f"evaluating {checkpoint} in a child process failed (exit status {done.returncode}); "
                               "its error is printed above")
        rows = json.loads(output_path.read_text())
    return pd.DataFrame(rows, columns=evaluation.RESULT_COLUMNS)


def _child(request_path: str, output_path: str) -> int:
    request = json.loads(Path(request_path).read_text())
    frame = evaluate_in_process(request["checkpoint"], request["model_args"], suite=request["suite"],
                                backend=request["backend"], **request["evaluate"])
    Path(output_path).write_text(frame.to_json(orient="records"))
    return 0


if __name__ == "__main__":
    sys.exit(_child(*sys.argv[1:3]))
