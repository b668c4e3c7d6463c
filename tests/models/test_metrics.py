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


def test_counting_does_not_load_torchdynamo() -> None:
    """The FLOP counter's dispatch wrapper used to import torch._dynamo (2.5-3 s) on first use."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "from torch import nn\n"
        "from engine.models.metrics import count_cost\n"
        "cost = count_cost(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), (1, 3, 8, 8))\n"
        "assert cost.macs == 8 * 3 * 9 * 36, cost.macs\n"
        "assert 'torch._dynamo' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2], check=False)
    assert result.returncode == 0, result.stderr
