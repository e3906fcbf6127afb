"""Stored measurements (moepaper.pipeline.measurements): reused while their inputs hold, else measured again."""

import pytest
import torch

from moepaper.damage import calibration_setting, expert_damage
from moepaper.pipeline.measurements import MeasurementFileError, measure, read_measurement, stored_expert_damage
from moepaper.testbed.tiny import random_batch, tiny_model


def batches(seed=0):
    return [random_batch(batch=2, seq_len=12, pad_last=3, seed=seed + s) for s in range(2)]


def counting(value=1.0):
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.full((2, 3), value, dtype=torch.float64)}, {"note": "hello", "n": 3}

    return compute, calls


def test_measurement_is_reused_while_its_inputs_hold_and_measured_again_otherwise(tmp_path):
    model = tiny_model("qwen3_moe")
    compute, calls = counting()
    options = dict(model=model, model_name="tiny", directory=tmp_path, code=["v1"], command="test")
    first = measure("m", compute, inputs={"data": "a"}, **options)
    assert not first.reused and first.path == tmp_path / "tiny" / "m.safetensors" and calls == [1]
    again = measure("m", compute, inputs={"data": "a"}, **options)
    assert again.reused and calls == [1] and again.values == {"note": "hello", "n": 3}
    torch.testing.assert_close(again["x"], first["x"])
    assert again.provenance["command"] == "test" and "seconds" in again.provenance
    measure("m", compute, inputs={"data": "b"}, **options)  # the data's checksum changed
    assert len(calls) == 2
    measure("m", compute, inputs={"data": "b"}, **{**options, "code": ["v2"]})  # the measuring code changed
    assert len(calls) == 3
    measure("m", compute, inputs={"data": "b"}, **{**options, "code": ["v2"]}, force=True)
    assert len(calls) == 4
    with torch.no_grad():  # other weights: another model's numbers
        next(model.parameters()).add_(1.0)
    measure("m", compute, inputs={"data": "b"}, **{**options, "code": ["v2"]})
    assert len(calls) == 5
    measure("m", compute, inputs={"data": "b"}, **{**options, "code": ["v2"], "directory": ""})  # nothing stored
    assert len(calls) == 6 and measure("m", compute, inputs={"data": "b"}, **{**options, "code": ["v2"]}).reused


def test_a_damaged_or_foreign_file_is_an_error_naming_it(tmp_path):
    model = tiny_model("qwen3_moe")
    compute, calls = counting()
    options = dict(model=model, model_name="tiny", directory=tmp_path, inputs={}, code=["v1"])
    path = measure("m", compute, **options).path
    data = bytearray(path.read_bytes())
    data[-8:] = b"\x00" * 8  # the last tensor's bytes changed
    path.write_bytes(bytes(data))
    with pytest.raises(MeasurementFileError, match="do not match the checksum") as error:
        measure("m", compute, **options)
    assert str(path) in str(error.value) and "force=True" in str(error.value)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(MeasurementFileError, match="not a readable stored measurement"):
        read_measurement(path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(path), metadata={"other": "header"})  # a safetensors file of something else
    with pytest.raises(MeasurementFileError, match=str(path)):
        measure("m", compute, **options)
    assert len(calls) == 1
    assert not measure("m", compute, **options, force=True).reused and len(calls) == 2  # force replaces it


def test_stored_expert_damage_gives_back_what_expert_damage_measures(tmp_path):
    model = tiny_model("qwen3_moe")
    direct = expert_damage(model, batches(), loss=True, progress=False)
    options = dict(name="damage", model_name="tiny", directory=tmp_path, loss=True)
    stored = stored_expert_damage(model, batches(), **options)
    reused = stored_expert_damage(model, batches(), **options)
    for damage in (stored, reused):
        for measure_name in direct.measures + ["output_energy"]:
            torch.testing.assert_close(getattr(damage, measure_name), getattr(direct, measure_name), rtol=0, atol=0)
        assert (damage.layers, damage.num_experts, damage.tokens) == (direct.layers, direct.num_experts, direct.tokens)
        assert damage.base_loss == direct.base_loss and damage.to_frame().equals(direct.to_frame())
    before = (tmp_path / "tiny" / "damage.safetensors").stat().st_mtime_ns
    stored_expert_damage(model, batches(seed=5), **options)  # other evaluation data: measured again
    assert (tmp_path / "tiny" / "damage.safetensors").stat().st_mtime_ns != before


def test_a_draws_suffix_does_not_change_its_setting():
    assert calibration_setting("embedded:literature@draw0of3", "literature") == "matched"
    assert calibration_setting("embedded:literature@draw0of3", "code") == "mismatched"
    assert calibration_setting("embedded:mixed@seed1", "code") == "mixed"
