"""Tiny random-initialised MoE models of every supported transformers family.

Used by the tests, the benchmarks and the notebooks' CI parameter set: nothing here
downloads weights. Each config keeps the family's real routing (renormalisation,
routed scaling, bias-corrected and group-limited selection, shared experts, dense
layers) at toy width, so code that works here works on the real checkpoints.
"""

from __future__ import annotations

import torch
import transformers

# Common toy sizes: hidden 32, 3 decoder layers, 4 heads, 8 routed experts, top-2.
_BASE = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# family name -> (config class name, model class name, family-specific config fields)
# Expert counts and top-k are passed by `tiny_config`; these fields set what makes
# each family itself (dense layers, shared experts, routing variant).
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(norm_topk_prob=False)),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            num_key_value_heads=4,  # DeepSeek attention needs kv heads == heads
            first_k_dense_replace=1,
            n_shared_experts=1,
            moe_intermediate_size=16,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            routed_scaling_factor=1.5,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
        ),
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeForCausalLM",
        dict(
            moe_layer_start_index=1,
            moe_layer_interval=1,
            moe_num_shared_experts=1,
            moe_intermediate_size=16,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(norm_topk_prob=True, moe_intermediate_size=16, mlp_only_layers=[0], decoder_sparse_step=1, head_dim=8),
    ),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict()),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            norm_topk_prob=False,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            mlp_only_layers=[],
            decoder_sparse_step=2,  # layers 1 (and 3, ...) are MoE, layer 0 and 2 dense
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            num_key_value_heads=4,
            first_k_dense_replace=1,
            n_shared_experts=1,
            moe_intermediate_size=16,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            routed_scaling_factor=2.5,
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(head_dim=8, sliding_window=16, layer_types=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict()),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict()),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            first_k_dense_replace=1,
            n_shared_experts=1,
            moe_intermediate_size=16,
            routed_scaling_factor=1.8,
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
            head_dim=8,
        ),
    ),
}

# The four families of the paper.
PAPER_FAMILIES = ("olmoe", "deepseek_v2", "ernie4_5_moe", "qwen3_moe")


def tiny_config(family: str, *, num_experts: int = 8, top_k: int = 2, **overrides):
    """A tiny config of `family` with `num_experts` routed experts and `top_k`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    config_name, _, fields = FAMILIES[family]
    kwargs = dict(_BASE)
    kwargs.update(fields)
    # Every family's config maps `num_experts` / `num_experts_per_tok` onto its own key.
    kwargs["num_experts_per_tok"] = top_k
    if family in ("mixtral", "gpt_oss", "phimoe", "granitemoe"):
        kwargs["num_local_experts"] = num_experts
    elif family in ("deepseek_v2", "deepseek_v3", "glm4_moe"):
        kwargs["n_routed_experts"] = num_experts
    elif family == "ernie4_5_moe":
        kwargs["moe_num_experts"] = num_experts
        kwargs["moe_k"] = top_k
        kwargs.pop("num_experts_per_tok")
    else:
        kwargs["num_experts"] = num_experts
    kwargs.update(overrides)
    return getattr(transformers, config_name)(**kwargs)


def tiny_model(family: str, *, num_experts: int = 8, top_k: int = 2, seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny random-initialised causal LM of `family`, in eval mode.

    Router weights, router and expert biases and DeepSeek-V3 / GLM bias-correction buffers are
    given random values (the families initialise some of them to zero, which would make routing
    degenerate and hide bugs); attention biases keep the family's initialisation. Tokens of
    `random_batch` reach at least half of every layer's experts (tests/testbed check it).
    """
    config = tiny_config(family, num_experts=num_experts, top_k=top_k, **overrides)
    model_class = getattr(transformers, FAMILIES[family][1])
    torch.manual_seed(seed)
    model = model_class(config).to(dtype).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # init routers, expert biases and the ERNIE statics, which start at zero; attention
            # biases keep their init: random ones add one large vector to every token's state,
            # so every token went to the same few experts (gpt-oss: 2 of 8 per layer)
            if name.endswith(("gate.weight", "router.weight")) or ("bias" in name and ".self_attn." not in name):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=generator) * 0.1)
        for name, param in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            if "experts" in name and name.endswith(("gate_up_proj", "down_proj")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def random_batch(vocab_size: int = 128, batch: int = 2, seq_len: int = 12, seed: int = 0, pad_last: int = 0):
    """A batch dict with `input_ids` and `attention_mask`; the last `pad_last` positions of row 0 are padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    if pad_last:
        attention_mask[0, seq_len - pad_last :] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# Special tokens of the tiny tokenizer, at the ids the configs above use.
TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3


def tiny_tokenizer(vocab_size: int = 128):
    """A character-level tokenizer for tiny models, built offline.

    Ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3 (what `moepaper.testbed.tiny` configs use),
    then newline, tab and printable ASCII: 101 tokens, any other character is ``<unk>``.
    Decoding joins the characters back into the text.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = ["\n", "\t"] + [chr(c) for c in range(32, 127)]
    tokens = list(TINY_SPECIAL_TOKENS) + characters
    if len(tokens) > vocab_size:
        raise ValueError(f"the tiny tokenizer has {len(tokens)} tokens, more than vocab_size={vocab_size}")
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def reference_expert_output(experts, e: int, h: torch.Tensor) -> torch.Tensor:
    """f_e(h) of expert `e` for ONE token `h` [H], straight from the fused weights, one matrix-vector
    product at a time: the tests' reference for the statistics and the baselines, written
    independently of `moepaper.statistics` (standard layout ``gate_up_proj [E, 2I, H]`` with the
    gate first; gpt-oss's transposed, interleaved, biased layout with its clamped SwiGLU)."""
    if experts.is_transposed:  # gpt-oss: [H, 2I] interleaved gate/up, biases, clamped SwiGLU
        gate_up = h @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
        gate, up = gate_up[0::2], gate_up[1::2]
        gate = gate.clamp(max=experts.limit)
        up = up.clamp(min=-experts.limit, max=experts.limit)
        x = (up + 1) * (gate * torch.sigmoid(gate * experts.alpha))
        return x @ experts.down_proj[e] + experts.down_proj_bias[e]
    gate_up = experts.gate_up_proj[e] @ h  # [2I]
    inter = experts.down_proj.shape[2]
    x = experts.act_fn(gate_up[:inter]) * gate_up[inter:]
    return experts.down_proj[e] @ x
