import json

import numpy as np
import pytest

from moepaper.testbed.card import routing_balance, top_experts_share, write_card


def test_routing_balance_even_and_starved():
    even = np.full((2, 8), 10)
    b = routing_balance(even)
    assert b["least_share_times_E"] == [1.0, 1.0]
    assert b["normalised_entropy"] == [1.0, 1.0]
    assert b["meets_min_share"]
    starved = even.copy()
    starved[1, 3] = 1  # share 1/71, times 8 = 0.113 < 1/4
    b = routing_balance(starved)
    assert b["least_used_expert"][1] == 3
    assert b["least_share_times_E"][1] == pytest.approx(8 / 71, abs=1e-4)
    assert not b["meets_min_share"]
    assert b["normalised_entropy"][1] < 1.0


def test_top_experts_share():
    counts = [[80, 10, 5, 5, 0, 0, 0, 0]]  # E = 8: the top E/8 = 1 expert
    assert top_experts_share({"counts": {"code": counts}}) == {"code": [0.8]}


def test_write_card_names_missing_files(tmp_path):
    (tmp_path / "data" / "models" / "m").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="heldout_metrics.json"):
        write_card("m", root=tmp_path)


def test_write_card_from_exported_files(tmp_path):
    folder = tmp_path / "data" / "models" / "m"
    folder.mkdir(parents=True)
    test = {d: {"bits_per_byte": 1.5, "loss_nats_per_token": 2.0, "documents": 3} for d in ("literature", "code")}
    (folder / "heldout_metrics.json").write_text(json.dumps({
        "parameters": 10, "checkpoint_mb": 0.1, "steps": 5, "tokens_seen": 100, "training_minutes": 1.0,
        "device": "cpu", "best_step": 5, "stop_reason": "max_steps", "test": test}))
    counts = {"literature": [[5, 5, 5, 5, 5, 5, 5, 5]], "code": [[9, 1, 5, 5, 5, 5, 5, 5]]}
    (folder / "routing.json").write_text(json.dumps({
        "counts": counts, "js_between_domains_bits": [0.1], "mean_top_domain_share": [0.5]}))
    (folder / "training_config.json").write_text(json.dumps({
        "num_layers": 1, "hidden_size": 8, "num_experts": 8, "moe_intermediate_size": 4, "top_k": 2,
        "vocab_size": 16, "router_aux_loss_coef": 0.01, "balance": "per_layer"}))
    text = write_card("m", root=tmp_path).read_text()
    assert "per-layer Switch loss" in text
    assert "| literature | 1.500 |" in text
    assert "calibration statistics not collected yet" in text
    assert "0.600" in text  # least share x E on the test split: 6 / 80 * 8


@pytest.mark.parametrize("name", __import__("moepaper.testbed.embedded", fromlist=["x"]).EMBEDDED_MODELS)
def test_committed_cards_are_up_to_date_and_state_the_draw_sizes(name):
    """Each committed card is what the generator writes from the committed files (regenerate it with
    `python -m moepaper.testbed.card <name>` after new statistics), and names each calibration
    draw with its size."""
    from moepaper.testbed.card import card_text
    from moepaper.testbed.embedded import embedded_model_dir

    committed = (embedded_model_dir(name) / "README.md").read_text()
    assert card_text(name) == committed
    if name != "embedded-16e":  # the 16-expert ablation has no general-domain draws
        assert "| `embedded-literature-draw0of3` | embedded:literature@draw0of3" in committed and "| 14,336 |" in committed
