"""load_model: one spec string for tiny, embedded, paper and hub/path models; offline errors are fast and clear."""

import time
from pathlib import Path

import pytest
import torch

from moepaper.pipeline.models import PAPER_MODELS, ModelNotAvailable, load_model, resolve_model_name
from moepaper.testbed.tiny import tiny_tokenizer
from moepaper.testbed.tiny import PAPER_FAMILIES



@pytest.mark.parametrize("family", PAPER_FAMILIES)
def test_tiny_spec_gives_the_family_and_a_fitting_tokenizer(family):
    model, tokenizer = load_model(f"tiny:{family}")
    assert model.config.model_type == family
    assert not model.training
    assert model.config._name_or_path == f"tiny:{family}"
    assert len(tokenizer) <= model.config.vocab_size
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id)
    ids = tokenizer("def f(x):\n\treturn x + 1", return_tensors="pt")["input_ids"]
    assert int(ids.max()) < model.config.vocab_size
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_tiny_tokenizer_round_trips_ascii_and_maps_the_rest_to_unk():
    tokenizer = tiny_tokenizer()
    text = "To be, or not to be:\n\tthat is the question. 3 * (4 + 5) = 27"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tokenizer.decode(ids) == text
    assert tokenizer("é", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_tokenizer(vocab_size=64)


def test_dtype_by_name_and_device():
    model, _ = load_model("tiny:olmoe", dtype="bfloat16", device_map="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model("tiny:olmoe", dtype="float31")


def test_unknown_tiny_family():
    with pytest.raises(ValueError, match="unknown tiny family 'nope'"):
        load_model("tiny:nope")


def test_paper_models_are_the_four_of_the_paper():
    assert PAPER_MODELS == {
        "olmoe": "allenai/OLMoE-1B-7B-0125-Instruct",
        "deepseek_v2_lite": "deepseek-ai/DeepSeek-V2-Lite-Chat",
        "ernie": "baidu/ERNIE-4.5-21B-A3B-PT",
        "qwen3": "Qwen/Qwen3-30B-A3B-Instruct-2507",
    }
    assert resolve_model_name("qwen3") == "Qwen/Qwen3-30B-A3B-Instruct-2507"
    assert resolve_model_name("some/model") == "some/model"


def test_uncached_hub_id_offline_fails_fast_and_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.time()
    with pytest.raises(ModelNotAvailable, match="hf download moepaper-tests/no-such-model"):
        load_model("moepaper-tests/no-such-model")
    assert time.time() - started < 1.0


def test_paper_key_offline_names_its_hub_id(monkeypatch):
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(PAPER_MODELS["olmoe"], "config.json"), str):
        pytest.skip("OLMoE is cached here")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailable, match="allenai/OLMoE-1B-7B-0125-Instruct"):
        load_model("olmoe")


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        load_model(str(tmp_path / "nothing" / "here"))


def test_local_path_loads_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = load_model("tiny:qwen3_moe")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model(str(tmp_path), dtype="float32")
    ids = loaded_tokenizer("abc", return_tensors="pt")["input_ids"]
    assert ids.tolist() == tokenizer("abc", return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)



@pytest.mark.parametrize("spec", ["embedded", "embedded-16e"])
def test_embedded_specs(spec):
    from moepaper.testbed.embedded import embedded_model_dir

    folder = embedded_model_dir(spec)
    if spec == "embedded" and not (folder / "model.safetensors").exists():
        pytest.skip("data/models/embedded is not there yet (the new default model is committed separately)")
    model, tokenizer = load_model(spec)
    assert model.config.model_type == "qwen3_moe"
    assert Path(model.config._name_or_path) == folder  # each spec loads its own checkpoint
    assert next(model.parameters()).dtype == torch.float32
    assert len(tokenizer) <= model.config.vocab_size
    if spec == "embedded-16e":
        assert (model.config.num_experts, model.config.num_experts_per_tok) == (16, 2)


@pytest.mark.parametrize("key", ["olmoe", "deepseek_v2_lite", "ernie", "qwen3"])
def test_rehearsal_spec_gives_the_paper_class_and_a_chat_tokenizer(key):
    from moepaper.pipeline.paper_models import paper_config

    model, tokenizer = load_model(f"rehearsal:{key}")
    assert model.config.model_type == paper_config(key).model_type
    assert model.config._name_or_path == f"rehearsal:{key}" and not model.training
    ids = tokenizer("def f(x):\n    return x + 1", return_tensors="pt")["input_ids"]
    assert int(ids.max()) < model.config.vocab_size
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                                         tokenize=False)
    assert chat == "<|user|>\n2+2?</s>\n<|assistant|>\n4</s>\n"
