"""Packed scoring (moepaper.pipeline.packed): the stock HFLM's answers from fewer tokens."""

import random

import pytest
import torch

from moepaper.testbed.tiny import FAMILIES, tiny_config, tiny_model

lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")


def _lm(model, cls, max_length=64, batch_size=4, **kwargs):
    """An lm-eval HFLM (`cls`) over `model` with a word-level tokenizer: "t5 t9" -> [5, 9]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(128)}, unk_token="t1"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t0")
    return cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, **kwargs)


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3_moe", max_position_embeddings=256).eval()


def _requests(seed=0, items=12, max_length=64):
    """Multiple-choice-like requests: 4 continuations per context (one-token ones, a repeated one, long ones),
    plus lone requests at the window's limit, in a shuffled order."""
    rng = random.Random(seed)
    requests = []
    for i in range(items):
        context = [rng.randrange(2, 128) for _ in range(rng.randrange(1, 30))]
        choices = [[rng.randrange(2, 128) for _ in range(rng.choice([1, 1, 3, 8]))] for _ in range(3)]
        choices.append(choices[0])  # the same choice twice: one branch, scored twice
        requests += [((f"c{i}", f"k{k}"), context, choice) for k, choice in enumerate(choices)]
    for j in range(4):  # rolling-window shaped: one context token, a full window
        requests.append(((f"w{j}", ""), [rng.randrange(2, 128)], [rng.randrange(2, 128) for _ in range(max_length)]))
    rng.shuffle(requests)
    return requests


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_requests_score_as_stock_hflm(model, attention):
    """Every request's loglikelihood equals stock HFLM's to float rounding and its greedy flag exactly,
    through fewer model calls, with sdpa's boolean and eager's additive tree mask."""
    from moepaper.pipeline.packed import PackedHFLM

    model.set_attn_implementation(attention)
    try:
        requests = _requests()
        stock = _lm(model, lm_eval_hf.HFLM)._loglikelihood_tokens(requests, disable_tqdm=True)
        packed_lm = _lm(model, PackedHFLM)
        packed = packed_lm._loglikelihood_tokens(requests, disable_tqdm=True)
    finally:
        model.set_attn_implementation("sdpa")
    assert packed_lm.packed_calls > 0
    assert [g for _, g in packed] == [g for _, g in stock]
    assert [ll for ll, _ in packed] == pytest.approx([ll for ll, _ in stock], rel=1e-5, abs=1e-4)
    assert len({ll for ll, _ in stock}) > len(requests) // 2  # the check is not vacuous: distinct values


def test_a_context_whose_branches_overflow_the_window_is_split(model):
    """Branches that would make a packed row longer than the model's window go to another row of the same context."""
    from moepaper.pipeline.packed import PackedHFLM

    context = list(range(2, 12))
    requests = [(None, context, [20 + k] * 30) for k in range(4)]  # 10 + 4 × 29 > 64
    packed_lm = _lm(model, PackedHFLM, max_length=64)
    trees = packed_lm._trees(requests)
    assert len(trees) > 1 and all(len(t) <= 64 for t in trees)
    stock = _lm(model, lm_eval_hf.HFLM, max_length=64)._loglikelihood_tokens(requests, disable_tqdm=True)
    packed = packed_lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [ll for ll, _ in packed] == pytest.approx([ll for ll, _ in stock], rel=1e-5, abs=1e-4)


def test_rolling_documents_score_as_stock_hflm(model):
    """loglikelihood_rolling: lm-eval's windows of every document in one sorted call, summed per document."""
    from lm_eval.api.instance import Instance

    from moepaper.pipeline.packed import PackedHFLM

    rng = random.Random(1)
    texts = [" ".join(f"t{rng.randrange(2, 128)}" for _ in range(n)) for n in (5, 63, 64, 65, 200, 17)]
    instances = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    stock = _lm(model, lm_eval_hf.HFLM).loglikelihood_rolling(instances, disable_tqdm=True)
    packed_lm = _lm(model, PackedHFLM)
    packed = packed_lm.loglikelihood_rolling(instances, disable_tqdm=True)
    assert packed_lm.packed_calls > 0
    assert packed == pytest.approx(stock, rel=1e-5)


def test_unsupported_models_take_the_stock_path(model):
    """An attention kernel the tree mask cannot be given to (here flex attention's name) or an automatic
    batch size: stock HFLM, bit for bit."""
    from moepaper.pipeline.packed import PackedHFLM

    requests = _requests(seed=2, items=3)
    stock = _lm(model, lm_eval_hf.HFLM)._loglikelihood_tokens(requests, disable_tqdm=True)
    packed_lm = _lm(model, PackedHFLM)
    original = model.config._attn_implementation
    model.config._attn_implementation = "flex_attention"
    try:
        assert not packed_lm.packable(requests)
    finally:
        model.config._attn_implementation = original
    too_long = [(None, [2] * 40, [3] * 30)]  # 70 > max_length + 1
    assert not packed_lm.packable(too_long)
    assert packed_lm._loglikelihood_tokens(too_long, disable_tqdm=True) == \
        _lm(model, lm_eval_hf.HFLM)._loglikelihood_tokens(too_long, disable_tqdm=True)
    assert packed_lm.packed_calls == 0
    assert packed_lm.packable(requests)
    packed = packed_lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert packed_lm.packed_calls > 0 and [g for _, g in packed] == [g for _, g in stock]
    assert [ll for ll, _ in packed] == pytest.approx([ll for ll, _ in stock], rel=1e-5, abs=1e-4)


def test_the_tree_mask_hides_sibling_branches():
    from moepaper.pipeline.packed import _Tree

    tree = _Tree([5, 6])
    starts = {}
    tree.add(0, [7, 8, 9], starts)
    tree.add(1, [7, 8, 9], starts)  # the same branch: no new tokens
    tree.add(2, [4], starts)  # one token: scored from the context's last position
    tree.add(3, [1, 2], starts)
    assert tree.tokens == [5, 6, 7, 8, 1] and tree.positions == [0, 1, 2, 3, 2]
    assert tree.requests[0][1] == tree.requests[1][1] == [1, 2, 3] and tree.requests[2][1] == [1]
    assert tree.requests[3][1] == [1, 4]
    mask = tree.mask()
    assert mask[4].tolist() == [True, True, False, False, True]  # branch 2 sees the context and itself
    assert mask[3].tolist() == [True, True, True, True, False]
    assert torch.equal(mask[:2, :2], torch.tril(torch.ones(2, 2, dtype=torch.bool)))


# ---------------------------------------------------------------- sliding windows and padding (issue 22)

# family -> config overrides giving it an attention window of 16 tokens (gpt-oss has one already: every other layer)
WINDOWED = {
    "gpt_oss": {},
    "mixtral": dict(sliding_window=16),
    "phimoe": dict(sliding_window=16),
    "qwen3_moe": dict(use_sliding_window=True, sliding_window=16),
    "qwen2_moe": dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),
}


def _stock_and_packed(model, requests, **kwargs):
    from moepaper.pipeline.packed import PackedHFLM

    stock = _lm(model, lm_eval_hf.HFLM, **kwargs)._loglikelihood_tokens(requests, disable_tqdm=True)
    packed_lm = _lm(model, PackedHFLM, **kwargs)
    return stock, packed_lm._loglikelihood_tokens(requests, disable_tqdm=True), packed_lm


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_scores_as_stock_hflm_with_and_without_a_window(family):
    """Requests of 14-40 tokens against stock HFLM on every family, with its attention as loaded (gpt-oss:
    eager) and, where the family has one, a 16-token window: a window shorter than a request sends the call
    to stock HFLM (the tree mask would let a windowed layer see the whole row); requests within the window
    are packed and equal stock; families without a window are packed."""
    from moepaper.pipeline.packed import attention_window

    rng = random.Random(5)
    requests = []
    for i in range(6):
        context = [rng.randrange(2, 128) for _ in range(rng.randrange(12, 30))]
        requests += [((f"c{i}", f"k{k}"), context, [rng.randrange(2, 128) for _ in range(rng.choice([1, 3, 10]))])
                     for k in range(4)]
    short = [r for r in requests if len(r[1]) + len(r[2]) - 1 <= 16] + [
        ((f"s{i}", ""), [rng.randrange(2, 128) for _ in range(9)], [rng.randrange(2, 128) for _ in range(i + 1)])
        for i in range(8)]
    variants = [tiny_model(family, max_position_embeddings=256)]
    if family in WINDOWED:
        variants.append(tiny_model(family, max_position_embeddings=256, **WINDOWED[family]))
    for model in variants:
        window = attention_window(model.config)
        stock, packed, packed_lm = _stock_and_packed(model, requests)
        assert [g for _, g in packed] == [g for _, g in stock]
        assert [ll for ll, _ in packed] == pytest.approx([ll for ll, _ in stock], rel=1e-5, abs=1e-4)
        assert (packed_lm.packed_calls == 0) == (window is not None)  # the long requests pass the window
        if window is not None:
            assert window == 16 and family in WINDOWED
            stock, packed, packed_lm = _stock_and_packed(model, short)
            assert packed_lm.packed_calls > 0
            assert [g for _, g in packed] == [g for _, g in stock]
            assert [ll for ll, _ in packed] == pytest.approx([ll for ll, _ in stock], rel=1e-5, abs=1e-4)
    if family == "gpt_oss":
        assert variants[0].config._attn_implementation == "eager"


def test_the_window_is_read_from_the_layer_types():
    from moepaper.pipeline.packed import attention_window

    assert attention_window(tiny_config("qwen2_moe")) is None  # sliding_window 0, every layer full attention
    assert attention_window(tiny_config("gpt_oss")) == 16  # sliding layers among full ones
    assert attention_window(tiny_config("gpt_oss", layer_types=["full_attention"] * 3)) is None
    assert attention_window(tiny_config("mixtral")) is None
    assert attention_window(tiny_config("mixtral", sliding_window=32)) == 32


@pytest.fixture(scope="module")
def window_suite(tmp_path_factory):
    """A multiple-choice and a rolling-loglikelihood lm-eval task whose items are longer than a 16-token window."""
    import json

    from moepaper.pipeline.evaluation import Benchmark, Suite

    folder = tmp_path_factory.mktemp("window_tasks")
    questions = [
        ("the cat sat on the mat and then the dog sat on the", ["rug by the door", "sky"], 0),
        ("one two three four five six seven eight nine", ["ten", "cat and dog"], 0),
        ("red orange yellow green blue indigo", ["violet", "seven"], 0),
        ("monday tuesday wednesday thursday friday saturday", ["sunday", "apple pie"], 0),
        ("a b c d e f g h i j k l m n o", ["p", "z y x w"], 0),
        ("1 + 1 = 2, 2 + 2 = 4, 3 + 3 =", ["6", "nine"], 0),
    ]
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps({"q": q, "choices": c, "label": l}) + "\n" for q, c, l in questions))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / "w_mc.yaml").write_text(
        "task: w_mc\n" + common + 'output_type: multiple_choice\ndoc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "w_ppl.yaml").write_text(
        "task: w_ppl\n" + common + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{q}}"\n'
        "metric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n")
    benchmarks = (Benchmark("w_mc", "MC", "w_mc", "acc,none"), Benchmark("w_ppl", "PPL", "w_ppl"))
    return Suite("window", benchmarks, include_path=(str(folder),), include_defaults=False)


def test_gpt_oss_full_evaluate_equals_stock(window_suite):
    """gpt-oss (eager attention, a 16-token window on every other layer) through a full `evaluate`:
    packed scoring gives stock HFLM's values and per-item outcomes."""
    from moepaper.pipeline.evaluation import evaluate
    from moepaper.testbed.tiny import tiny_tokenizer

    model, tokenizer = tiny_model("gpt_oss", max_position_embeddings=256), tiny_tokenizer()
    assert model.config._attn_implementation == "eager"
    packed = evaluate(model, tokenizer, window_suite, packed=True)
    stock = evaluate(model, tokenizer, window_suite, packed=False)
    assert list(packed["status"]) == ["ok", "ok"]
    assert list(packed["value"]) == pytest.approx(list(stock["value"]), rel=1e-6)
    assert packed.set_index("benchmark").loc["w_mc", "items"] == stock.set_index("benchmark").loc["w_mc", "items"]


def test_packed_padding_stays_inside_the_embedding(model):
    """A tokenizer whose pad id lies beyond the embedding (id 200 of 128): stock lm-eval pads with 0 and
    works; the packed path pads with 0 too, never indexing the embedding out of range."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from moepaper.pipeline.packed import PackedHFLM

    vocab = {f"t{i}": i for i in range(128)} | {"<pad>": 200}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="t0")
    assert tokenizer.pad_token_id == 200 >= model.get_input_embeddings().num_embeddings
    requests = _requests(seed=3, items=4)
    stock = lm_eval_hf.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=64)._loglikelihood_tokens(
        requests, disable_tqdm=True)
    packed_lm = PackedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=64)
    packed = packed_lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert packed_lm.packed_calls > 0
    assert [g for _, g in packed] == [g for _, g in stock]
    assert [ll for ll, _ in packed] == pytest.approx([ll for ll, _ in stock], rel=1e-5, abs=1e-4)
