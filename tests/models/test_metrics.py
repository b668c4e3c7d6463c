"""Parameter and MAC counts, grouped convolutions included."""

from torch import nn

from engine.models.metrics import count_cost


def test_mac_counter_counts_grouped_convs() -> None:
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1, groups=8))
    cost = count_cost(model, (1, 16, 8, 8))
    dense, grouped = 32 * 16 * 9 * 64, 32 * 4 * 9 * 64
    assert cost.layer_macs == {"0": dense, "1": grouped}
    assert cost.macs == dense + grouped
    assert cost.params == 32 * 16 * 9 + 32 + 32 * 4 * 9 + 32
