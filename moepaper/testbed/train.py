"""`python -m moepaper.testbed.train`: train the embedded default model.

A small Qwen3MoeForCausalLM (4 layers, 64 experts of width 32, top-8 by default) and its byte-level BPE tokenizer,
trained on the train splits of the three corpus domains (`moepaper.testbed.corpus`), equal
shares per domain. Resumable: the checkpoint and optimizer state live in
`runs/train_embedded/` (git-ignored) and a rerun continues from it. Training stops when
the validation loss has not improved for `patience` evaluations or when the wall-clock
budget is spent, whichever comes first; the best checkpoint (by validation loss) is
exported to `data/models/embedded/` with its tokenizer, training config, held-out
per-domain losses and bits per byte on the test split, and per-domain routing frequencies.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..project import RUNS, project_root
from .corpus import DOMAINS, read_split
from .embedded import embedded_model_dir

EOS = "<|endoftext|>"


@dataclass
class TrainConfig:
    # tokenizer
    vocab_size: int = 4096
    # model (Qwen3-MoE)
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    num_experts: int = 64  # fine-grained like OLMoE: 64 experts, top-8, narrow experts
    top_k: int = 8
    moe_intermediate_size: int = 32
    router_aux_loss_coef: float = 0.01
    # "per_layer": each layer's own Switch-style loss, averaged over layers (what OLMoE,
    # Qwen-MoE and DeepSeek train with); "pooled": transformers' built-in aux_loss, which
    # pools the router counts of all layers (the `embedded-pooled` and `embedded-16e` ablations were trained so)
    balance: str = "per_layer"
    router_z_loss_coef: float = 0.001
    seq_len: int = 512
    # optimisation
    batch_size: int = 8
    lr: float = 2e-3
    min_lr_fraction: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # stopping
    budget_minutes: float = 48.0  # of optimisation steps; validation and export add about 5
    max_steps: int = 2100
    eval_every: int = 100
    eval_windows: int = 16  # validation windows of seq_len tokens per domain
    patience: int = 4  # evaluations without improvement before stopping
    min_delta: float = 0.002  # an improvement smaller than this (nats) does not count
    seed: int = 0
    export_dtype: str = "bfloat16"


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(vocab_size: int):
    """A byte-level BPE trained on the train splits, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    documents = [text for domain in DOMAINS for text in read_split(domain, "train")]
    tokenizer.train_from_iterator(documents, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        model_max_length=TrainConfig.seq_len,
        clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------- model


def build_model(cfg: TrainConfig, tokenizer):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,  # dense MLP size; unused, every layer is MoE
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        moe_intermediate_size=cfg.moe_intermediate_size,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(cfg.seed)
    return Qwen3MoeForCausalLM(config)


# ---------------------------------------------------------------- data


def token_stream(tokenizer, domain: str, split: str) -> np.ndarray:
    """All documents of a split, each preceded by EOS, as one int32 array."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(read_split(domain, split), add_special_tokens=False, verbose=False)["input_ids"]
    return np.fromiter((t for doc in ids for t in [eos, *doc]), dtype=np.int32)


def train_batch(streams: dict[str, np.ndarray], cfg: TrainConfig, step: int) -> torch.Tensor:
    """Random windows of seq_len + 1 tokens; rows cycle through the domains (equal shares)."""
    rng = np.random.default_rng([cfg.seed, step])
    rows = []
    for i in range(cfg.batch_size):
        stream = streams[DOMAINS[(step * cfg.batch_size + i) % len(DOMAINS)]]
        start = rng.integers(0, len(stream) - cfg.seq_len - 1)
        rows.append(stream[start : start + cfg.seq_len + 1])
    return torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)


def eval_windows(stream: np.ndarray, cfg: TrainConfig) -> torch.Tensor:
    n = min(cfg.eval_windows, (len(stream) - 1) // cfg.seq_len)
    rows = [stream[i * cfg.seq_len : i * cfg.seq_len + cfg.seq_len + 1] for i in range(n)]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


@torch.no_grad()
def window_loss(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss (nats) over fixed windows; no auxiliary loss."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        logits = model(input_ids=batch[:, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    model.train()
    return total / count


@torch.no_grad()
def score_documents(model, tokenizer, documents: list[str], seq_len: int, batch_size: int = 8) -> tuple[dict, list]:
    """Loss and bits per byte of whole documents, each scored after an EOS token, and the
    per-layer expert counts of their tokens' top-k routing (one pass for both).

    Documents longer than seq_len tokens are scored in disjoint windows, each restarting
    from its first token, as lm-eval's loglikelihood_rolling does.
    Returns (metrics, counts) with counts[layer][expert] = top-k assignments.
    """
    model.eval()
    eos = tokenizer.eos_token_id
    top_k = model.config.num_experts_per_tok
    windows = []
    for ids in tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]:
        sequence = [eos, *ids]
        for start in range(0, len(ids), seq_len):
            windows.append(sequence[start : start + seq_len + 1])
    nll, tokens, counts = 0.0, 0, None
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        width = max(len(w) for w in batch) - 1
        input_ids = torch.full((len(batch), width), eos, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, window in enumerate(batch):
            input_ids[row, : len(window) - 1] = torch.tensor(window[:-1])
            labels[row, : len(window) - 1] = torch.tensor(window[1:])
            mask[row, : len(window) - 1] = 1
        out = model(input_ids=input_ids, attention_mask=mask, output_router_logits=True)  # logits (B, T, V)
        nll += torch.nn.functional.cross_entropy(
            out.logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        tokens += int(mask.sum())
        real = mask.flatten().bool()  # router logits are (B * T, E): drop padding positions
        per_layer = torch.stack([
            torch.bincount(logits[real].topk(top_k, dim=-1).indices.flatten(), minlength=logits.shape[-1])
            for logits in out.router_logits
        ])  # (L, E)
        counts = per_layer if counts is None else counts + per_layer
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    metrics = {
        "loss_nats_per_token": nll / tokens,
        "bits_per_byte": nll / math.log(2) / n_bytes,
        "tokens": tokens,
        "bytes": n_bytes,
        "documents": len(documents),
    }
    return metrics, counts.tolist()


def specialisation_summary(counts: dict[str, list[list[int]]]) -> dict:
    """Frequencies and how far they are from uniform, per layer.

    - ``kl_from_uniform_bits[domain][layer]``: KL(p_domain || uniform over experts).
    - ``js_between_domains_bits[layer]``: Jensen-Shannon divergence among the domains'
      expert distributions (0 = identical routing; log2(3) = 1.585 is the maximum for 3).
    - ``expert_top_domain_share[layer]``: for each expert, the largest share one domain has
      of its (domain-size-normalised) traffic; 1/3 for an expert that serves all domains
      alike, 1 for an expert only one domain uses.
    - ``top4_overlap[layer]``: experts shared by every pair of domains' four most-used experts.
    """
    domains = list(counts)
    freq = {d: np.asarray(c, dtype=float) for d, c in counts.items()}
    freq = {d: c / c.sum(axis=1, keepdims=True) for d, c in freq.items()}  # (L, E), rows sum to 1
    num_layers, num_experts = freq[domains[0]].shape
    uniform = 1.0 / num_experts

    def kl(p, q):
        p = np.clip(p, 1e-12, None)
        q = np.clip(q, 1e-12, None)
        return float((p * np.log2(p / q)).sum())

    summary = {
        "domains": domains,
        "counts": counts,
        "frequency": {d: f.round(5).tolist() for d, f in freq.items()},
        "kl_from_uniform_bits": {d: [kl(freq[d][l], np.full(num_experts, uniform)) for l in range(num_layers)]
                                 for d in domains},
        "js_between_domains_bits": [],
        "expert_top_domain_share": [],
        "mean_top_domain_share": [],
        "experts_with_top_share_over_0.6": [],
        "top4_experts": {d: [np.argsort(-freq[d][l])[:4].tolist() for l in range(num_layers)] for d in domains},
        "top4_overlap": [],
    }
    for layer in range(num_layers):
        rows = np.stack([freq[d][layer] for d in domains])  # (D, E)
        mixture = rows.mean(axis=0)
        summary["js_between_domains_bits"].append(float(np.mean([kl(r, mixture) for r in rows])))
        share = rows / np.clip(rows.sum(axis=0, keepdims=True), 1e-12, None)  # (D, E)
        top_share = share.max(axis=0)
        summary["expert_top_domain_share"].append(top_share.round(4).tolist())
        summary["mean_top_domain_share"].append(float(top_share.mean()))
        summary["experts_with_top_share_over_0.6"].append(int((top_share > 0.6).sum()))
        top4 = {d: set(np.argsort(-freq[d][layer])[:4].tolist()) for d in domains}
        summary["top4_overlap"].append(
            {f"{a}&{b}": len(top4[a] & top4[b]) for i, a in enumerate(domains) for b in domains[i + 1 :]}
        )
    return summary


# ---------------------------------------------------------------- training


def per_layer_balance_loss(router_logits, top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style load-balancing loss computed inside each layer, averaged over layers.

    For one layer with E experts and top-k routing, over its tokens t: f_e = fraction of
    tokens that route to expert e (sums to k over the experts), P_e = mean router
    probability of e; the loss is E * sum_e f_e * P_e, which is k for perfectly balanced
    routing. This is transformers' `load_balancing_loss_func` applied to one layer (same
    normalisation, so the same coefficient means the same pressure); that function
    concatenates the logits of all layers first, so it balances the pooled counts and lets
    one layer starve an expert that another layer over-uses.
    router_logits: one (tokens, E) tensor per MoE layer; mask: (tokens,) bool of real tokens.
    """
    losses = []
    for logits in router_logits:
        if mask is not None:
            logits = logits[mask]
        probs = torch.softmax(logits.float(), dim=-1)  # (T, E)
        num_experts = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices  # (T, k)
        share = torch.zeros(num_experts, device=probs.device).scatter_add_(
            0, chosen.flatten(), torch.ones(chosen.numel(), device=probs.device)
        ) / probs.shape[0]  # (E,), sums to k
        losses.append(num_experts * (share * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def router_z_loss(router_logits) -> torch.Tensor:
    """Mean squared log-sum-exp of the router logits (ST-MoE), averaged over layers."""
    return torch.stack([torch.logsumexp(l.float(), dim=-1).pow(2).mean() for l in router_logits]).mean()


def learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over steps, then cosine decay over the run: progress is the larger of
    the share of max_steps done and the share of the wall-clock budget spent."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * warm * (cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * cosine)


def train(cfg: TrainConfig, run_dir: Path | None = None, out_dir: Path | None = None, fresh: bool = False) -> dict:
    from transformers import PreTrainedTokenizerFast

    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run_dir = Path(run_dir) if run_dir is not None else project_root() / RUNS / "train_embedded"
    out_dir = Path(out_dir) if out_dir is not None else embedded_model_dir()
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / "checkpoint.pt"
    tokenizer_dir = run_dir / "tokenizer"

    if (tokenizer_dir / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    else:
        tokenizer = train_tokenizer(cfg.vocab_size)
        tokenizer.save_pretrained(tokenizer_dir)
    print(f"tokenizer: {len(tokenizer)} tokens", flush=True)

    streams = {d: token_stream(tokenizer, d, "train") for d in DOMAINS}
    validation = {d: eval_windows(token_stream(tokenizer, d, "validation"), cfg) for d in DOMAINS}
    print("train tokens per domain: " + ", ".join(f"{d} {len(s):,}" for d, s in streams.items()), flush=True)

    model = build_model(cfg, tokenizer).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    state = {"step": 0, "elapsed_s": 0.0, "tokens_seen": 0, "best_val": float("inf"), "best_step": 0,
             "bad_evals": 0, "stop_reason": None}
    if checkpoint_path.exists():
        saved = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state.update(saved["state"])
        print(f"resumed at step {state['step']} ({state['elapsed_s'] / 60:.1f} min trained)", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters on {device}", flush=True)

    budget_s = cfg.budget_minutes * 60
    log = (run_dir / "log.jsonl").open("a")
    model.train()
    bar = tqdm(total=int(budget_s), initial=int(state["elapsed_s"]), unit="s", desc="train", mininterval=5)
    while state["stop_reason"] is None:
        step_start = time.perf_counter()
        batch = train_batch(streams, cfg, state["step"]).to(device)  # (B, T + 1)
        lr = learning_rate(cfg, state["step"], max(state["elapsed_s"] / budget_s, state["step"] / cfg.max_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        out = model(input_ids=batch[:, :-1], output_router_logits=True)  # logits (B, T, V)
        lm_loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        if cfg.balance == "per_layer":
            balance = per_layer_balance_loss(out.router_logits, cfg.top_k)
        elif cfg.balance == "pooled":
            balance = out.aux_loss
        else:
            raise ValueError(f"balance {cfg.balance!r}: choose 'per_layer' or 'pooled'")
        loss = lm_loss + cfg.router_aux_loss_coef * balance  # load balancing keeps every expert in use
        if cfg.router_z_loss_coef:
            loss = loss + cfg.router_z_loss_coef * router_z_loss(out.router_logits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["tokens_seen"] += batch[:, :-1].numel()
        seconds = time.perf_counter() - step_start
        state["elapsed_s"] += seconds
        bar.update(int(state["elapsed_s"]) - bar.n)
        bar.set_postfix(step=state["step"], loss=f"{lm_loss.item():.3f}", tok_s=f"{batch[:, :-1].numel() / seconds:.0f}")
        entry = {"step": state["step"], "loss": round(lm_loss.item(), 4), "aux_loss": round(balance.item(), 4),
                 "lr": lr, "elapsed_s": round(state["elapsed_s"], 1), "tokens_seen": state["tokens_seen"]}
        if state["step"] % cfg.eval_every == 0:
            val = {d: window_loss(model, w.to(device)) for d, w in validation.items()}
            mean_val = float(np.mean(list(val.values())))
            entry["validation_loss"] = {**{d: round(v, 4) for d, v in val.items()}, "mean": round(mean_val, 4)}
            if mean_val < state["best_val"] - cfg.min_delta:
                state.update(best_val=mean_val, best_step=state["step"], bad_evals=0)
                torch.save(model.state_dict(), run_dir / "best_model.pt")
            else:
                state["bad_evals"] += 1
            tqdm.write(f"step {state['step']}: train {lm_loss.item():.3f}, validation "
                       + ", ".join(f"{d} {v:.3f}" for d, v in val.items())
                       + f" (best {state['best_val']:.3f} at {state['best_step']})")
            if state["bad_evals"] >= cfg.patience:
                state["stop_reason"] = f"validation loss did not improve for {cfg.patience} evaluations"
        if state["elapsed_s"] >= budget_s:
            state["stop_reason"] = state["stop_reason"] or f"wall-clock budget of {cfg.budget_minutes} min spent"
        if state["step"] >= cfg.max_steps:
            state["stop_reason"] = state["stop_reason"] or f"max_steps {cfg.max_steps} reached"
        log.write(json.dumps(entry) + "\n")
        if state["step"] % cfg.eval_every == 0 or state["stop_reason"]:
            log.flush()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                        "config": dataclasses.asdict(cfg)}, checkpoint_path)
    bar.close()
    log.close()
    print(f"stopped: {state['stop_reason']}; best validation {state['best_val']:.4f} at step {state['best_step']}",
          flush=True)
    if (run_dir / "best_model.pt").exists():
        model.load_state_dict(torch.load(run_dir / "best_model.pt", map_location=device))
    return export(model, tokenizer, cfg, state, run_dir, out_dir)


def export(model, tokenizer, cfg: TrainConfig, state: dict, run_dir: Path, out_dir: Path) -> dict:
    """Write the model, tokenizer, configs, held-out metrics and routing frequencies."""
    model = model.float().cpu().eval()
    metrics, counts = {}, {}
    for domain in DOMAINS:
        metrics[domain], counts[domain] = score_documents(model, tokenizer, read_split(domain, "test"), cfg.seq_len)
    routing = specialisation_summary(counts)

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.safetensors"):
        old.unlink()
    model.to(getattr(torch, cfg.export_dtype)).save_pretrained(out_dir)
    # transformers writes only `num_local_experts`; original Qwen3-MoE configs (and readers
    # built for them) use `num_experts`, so write both
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["num_experts"] = config["num_local_experts"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    summary = {
        "parameters": n_params,
        "checkpoint_mb": round(sum(f.stat().st_size for f in out_dir.glob("*.safetensors")) / 1e6, 2),
        "steps": state["step"],
        "best_step": state["best_step"],
        "tokens_seen": state["tokens_seen"],
        "training_minutes": round(state["elapsed_s"] / 60, 2),
        "stop_reason": state["stop_reason"],
        "device": "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
        "best_validation_loss": state["best_val"],
        "test": metrics,
    }
    (out_dir / "training_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    (out_dir / "heldout_metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out_dir / "routing.json").write_text(json.dumps(routing) + "\n")
    # the loss log: every evaluation and every tenth step
    kept = [e for e in log if "validation_loss" in e or e["step"] % 10 == 0]
    (out_dir / "training_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in kept))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("test", "validation")}, indent=1))
    for d in DOMAINS:
        print(f"{d}: test loss {metrics[d]['loss_nats_per_token']:.3f} nats/token, "
              f"{metrics[d]['bits_per_byte']:.3f} bits/byte; routing KL from uniform (bits) per layer "
              + ", ".join(f"{x:.2f}" for x in routing["kl_from_uniform_bits"][d]))
    print("JS between domains per layer (bits): " + ", ".join(f"{x:.3f}" for x in routing["js_between_domains_bits"]))
    print("mean top-domain share per expert per layer: "
          + ", ".join(f"{x:.2f}" for x in routing["mean_top_domain_share"]))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the embedded default MoE model (resumable).")
    for field in dataclasses.fields(TrainConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    parser.add_argument("--fresh", action="store_true", help="delete the run folder and start over")
    parser.add_argument("--run-dir", type=Path, default=None, help="checkpoints while training (default runs/train_embedded)")
    parser.add_argument("--out-dir", type=Path, default=None, help="the exported model (default data/models/embedded)")
    args = vars(parser.parse_args(argv))
    fresh, run_dir, out_dir = args.pop("fresh"), args.pop("run_dir"), args.pop("out_dir")
    train(TrainConfig(**args), run_dir=run_dir, out_dir=out_dir, fresh=fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
