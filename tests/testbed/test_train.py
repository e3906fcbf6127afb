import torch

from moepaper.testbed.train import TrainConfig, learning_rate, per_layer_balance_loss, router_z_loss


def test_per_layer_balance_is_transformers_loss_on_one_layer():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    torch.manual_seed(0)
    logits = torch.randn(50, 16)
    ours = per_layer_balance_loss([logits], top_k=4)
    theirs = load_balancing_loss_func((logits,), 16, 4)
    assert torch.allclose(ours, theirs)


def test_per_layer_balance_does_not_pool_layers():
    """One layer sends every token to experts 0-1, the other to experts 2-3: pooled counts
    look even, per-layer counts do not."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    first = torch.full((40, 4), -10.0)
    first[:, :2] = 10.0
    second = torch.full((40, 4), -10.0)
    second[:, 2:] = 10.0
    per_layer = per_layer_balance_loss([first, second], top_k=2)
    pooled = load_balancing_loss_func((first, second), 4, 2)
    assert per_layer.item() > 1.9 * pooled.item()  # 4 against 2 (balanced: top_k = 2)


def test_router_z_loss():
    zeros = torch.zeros(3, 4)
    assert torch.allclose(router_z_loss([zeros]), torch.log(torch.tensor(4.0)) ** 2)


def test_learning_rate_follows_steps_or_budget():
    cfg = TrainConfig(lr=1.0, warmup_steps=1, min_lr_fraction=0.1)
    assert learning_rate(cfg, 10, 0.0) == 1.0
    assert abs(learning_rate(cfg, 10, 1.0) - 0.1) < 1e-12
