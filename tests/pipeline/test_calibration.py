"""Packing the embedded corpus: calibration and held-out splits (one packer for both)."""

import pytest
import torch

from moepaper.pipeline.calibration import calibration_batches
from moepaper.testbed.corpus import read_split
from moepaper.testbed.tiny import tiny_tokenizer


def test_held_out_windows_come_from_the_test_split():
    tokenizer = tiny_tokenizer()
    result = list(calibration_batches("embedded:code", tokenizer, split="test", n_sequences=5, seq_len=64, batch_size=2))
    assert [b["input_ids"].shape for b in result] == [(2, 64), (2, 64), (1, 64)]
    assert all(b["attention_mask"].all() for b in result)
    again = list(calibration_batches("embedded:code", tokenizer, split="test", n_sequences=5, seq_len=64, batch_size=2))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(result, again))
    text = tokenizer.decode(result[0]["input_ids"][0][:40], skip_special_tokens=True)
    test_text = "\n".join(read_split("code", "test"))
    assert text[:30] in test_text
    calibration = list(calibration_batches("embedded:code", tokenizer, n_sequences=1, seq_len=64))
    assert not torch.equal(calibration[0]["input_ids"][0], result[0]["input_ids"][0])
    with pytest.raises(ValueError, match="holds only"):
        list(calibration_batches("embedded:code", tokenizer, split="test", n_sequences=10**7, seq_len=64))
    with pytest.raises(ValueError, match="only embedded sources have splits"):
        list(calibration_batches("c4", tokenizer, split="test", n_sequences=1, seq_len=8))
