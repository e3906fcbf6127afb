"""The tiny testbed models route tokens over most of their experts, so tests on them test routing."""

import pytest

from moepaper import collect_statistics
from moepaper.testbed.tiny import FAMILIES, random_batch, tiny_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tokens_of_the_test_batch_reach_at_least_half_the_experts_of_every_layer(family):
    """Issue 22: random attention biases made every gpt-oss token alike, routed to 2 of 8 experts per layer."""
    model = tiny_model(family)
    stats = collect_statistics(model, [random_batch()], progress=False)
    for layer, count, n in zip(stats.layers, stats.count, stats.num_experts):
        used = int((count[:n] > 0).sum())
        assert used >= n / 2, f"{family} layer {layer}: tokens reach {used} of {n} experts"
