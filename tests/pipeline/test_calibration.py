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


@pytest.mark.parametrize("source", ["embedded:mixed", "embedded:code", "embedded:math"])
def test_calibration_seed_draws_other_windows(source):
    """Another seed draws other windows of the same source; the same seed the same windows."""
    tokenizer = tiny_tokenizer()

    def draw(seed):
        return torch.cat([b["input_ids"] for b in calibration_batches(source, tokenizer, n_sequences=6, seq_len=64, seed=seed)])

    first, again = draw(0), draw(0)
    assert torch.equal(first, again)
    assert torch.equal(draw(1), draw(1))
    windows = {seed: {tuple(row.tolist()) for row in draw(seed)} for seed in (0, 1, 2)}
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert len(windows[a] & windows[b]) < 6, (source, a, b)  # not the same draw
    assert not torch.equal(first, draw(1))


def test_calibration_names_of_seeded_draws():
    from moepaper.pipeline.calibration import (
        calibration_description,
        calibration_name,
        calibration_name_from_description,
        parse_calibration_name,
    )
    from moepaper.pipeline.keys import entry_folder, slug

    assert calibration_name("embedded:mixed", 0) == "embedded:mixed"  # seed 0: the committed names stay valid
    assert calibration_name("embedded:mixed", 1) == "embedded:mixed@seed1"
    assert slug(calibration_name("embedded:code", 2)) == "embedded-code-seed2"
    assert str(entry_folder("embedded", "embedded:mixed@seed1", "man", 4)) == "embedded/embedded-mixed-seed1/S_1_0_1__removed4"
    for source in ("embedded:mixed", "c4", "standin:math"):
        for seed in (0, 1, 12):
            name = calibration_name(source, seed)
            assert parse_calibration_name(name) == (source, seed)
            description = calibration_description(source, n_sequences=80, seq_len=512, seed=seed)
            assert calibration_name_from_description(description) == name
    merged = " + ".join(calibration_description("embedded:code", n_sequences=8, seq_len=64, seed=s) for s in (0, 1))
    assert calibration_name_from_description(merged) == "embedded:code"
    assert calibration_name_from_description("my own data") == "my own data"
    with pytest.raises(ValueError, match="already names a seed"):
        calibration_name("embedded:mixed@seed1", 1)
    for bad in ("embedded:mixed@seed0", "embedded:mixed@seedx", "embedded:mixed@seed01"):
        with pytest.raises(ValueError, match="suffix"):
            parse_calibration_name(bad)
    with pytest.raises(ValueError, match="integer >= 0"):
        calibration_name("embedded:mixed", -1)


@pytest.mark.parametrize("source", ["embedded:literature", "embedded:mixed", "embedded:code", "embedded:math", "standin:c4"])
def test_disjoint_draws_share_no_document_and_no_window(source):
    """The draws of `disjoint_draws` read disjoint parts of the split: no document is in two of them,
    together they hold every document, and each is the same on every call."""
    from moepaper.pipeline.calibration import calibration_texts, disjoint_draws

    tokenizer = tiny_tokenizer()
    names = disjoint_draws(source, 3)
    assert names == [f"{source}@draw{k}of3" for k in range(3)]
    from collections import Counter

    texts = [list(calibration_texts(name, tokenizer)) for name in names]
    assert all(texts)
    everything = list(calibration_texts(source, tokenizer))
    assert Counter(t for part in texts for t in part) == Counter(everything)  # a partition of the documents
    repeated = {t for t, k in Counter(everything).items() if k > 1}  # the split itself holds one document twice (code)
    for a in range(3):
        for b in range(a + 1, 3):
            assert not (set(texts[a]) & set(texts[b])) - repeated, (source, a, b)
    assert list(calibration_texts(names[1], tokenizer)) == texts[1]
    if source.startswith("embedded:"):
        windows = [{tuple(r.tolist()) for r in torch.cat([b["input_ids"] for b in calibration_batches(name, tokenizer, n_sequences=4, seq_len=64)])}
                   for name in names]
        assert not (windows[0] & windows[1]) and not (windows[1] & windows[2])


def test_disjoint_draw_names():
    from moepaper.pipeline.calibration import (
        calibration_description,
        calibration_name,
        calibration_name_from_description,
        disjoint_draws,
        parse_calibration_name,
        parse_draw,
    )
    from moepaper.pipeline.keys import slug

    name = disjoint_draws("embedded:literature")[2]
    assert parse_draw(name) == ("embedded:literature", 2, 3)
    assert parse_calibration_name(name) == ("embedded:literature", 2)
    assert calibration_name(name, 0) == name
    assert slug(name) == "embedded-literature-draw2of3"
    description = calibration_description(name, n_sequences=28, seq_len=512, seed=0)
    assert "moepaper embedded corpus" in description and calibration_name_from_description(description) == name
    with pytest.raises(ValueError, match="has no seeds|no seeds"):
        calibration_name(name, 1)
    for bad in ("embedded:code@draw3of3", "embedded:code@draw1of0", "embedded:code@drawxof3", "embedded:code@draw01of3"):
        with pytest.raises(ValueError, match="disjoint draw is named"):
            parse_draw(bad)
    with pytest.raises(ValueError, match="already names a draw"):
        disjoint_draws(name)
    with pytest.raises(ValueError, match="integer >= 1"):
        disjoint_draws("embedded:code", 0)
