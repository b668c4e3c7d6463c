"""Device names, the autocast dtype per card, and the precision and autotuner switches: what a
CPU can show of the GPU paths, plus checks that run on a CUDA machine."""

from __future__ import annotations

import pytest
import torch

from engine.common.devices import (
    autocast_dtype,
    check_device,
    cudnn_benchmark,
    device_autocast_dtype,
    exact_fp32,
    resolve_device,
)
from engine.common.errors import ConfigError

PRECISION_SWITCHES = (torch.backends.cudnn.conv, torch.backends.cuda.matmul,
                      torch.backends.mkldnn.conv, torch.backends.mkldnn.matmul)


@pytest.mark.parametrize("name", ["cuda:-1", "cuda:x", "cuda: 1", "cuda:1.5", "gpu", "cuda0", 3, None])
def test_malformed_devices_are_one_config_error(name: object) -> None:
    with pytest.raises(ConfigError, match=r"^run.device must be auto, cpu, cuda or cuda:N \(N a device number"):
        resolve_device(name, "run.device")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cuda:N"):
        check_device(name)  # type: ignore[arg-type]


def test_plain_names_resolve() -> None:
    assert resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    check_device("auto")
    check_device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_a_gpu_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="^finetune.device 'cuda:0' asks for CUDA, but no CUDA device"):
        resolve_device("cuda:0", "finetune.device")


@pytest.mark.parametrize(("capability", "dtype"), [
    ((6, 1), torch.float16),   # Pascal
    ((7, 0), torch.float16),   # V100: torch counts its emulated bf16 as supported
    ((7, 5), torch.float16),   # T4
    ((8, 0), torch.bfloat16),  # A100
    ((8, 6), torch.bfloat16),
    ((9, 0), torch.bfloat16),  # H100/H200
    ((12, 0), torch.bfloat16),
    (None, None),              # not CUDA: no autocast
])
def test_autocast_dtype_follows_the_card_capability(capability: tuple[int, int] | None, dtype: torch.dtype | None) -> None:
    assert autocast_dtype(capability) == dtype


def test_cpu_has_no_autocast_dtype() -> None:
    assert device_autocast_dtype(torch.device("cpu")) is None


def test_exact_fp32_switches_tf32_off_and_restores() -> None:
    before = [s.fp32_precision for s in PRECISION_SWITCHES]
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    try:
        with pytest.raises(RuntimeError, match="inside"), exact_fp32():
            assert [s.fp32_precision for s in PRECISION_SWITCHES] == ["ieee"] * 4
            raise RuntimeError("inside")
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        torch.backends.cudnn.conv.fp32_precision = before[0]
    assert [s.fp32_precision for s in PRECISION_SWITCHES] == before


def test_cudnn_benchmark_is_on_inside_only() -> None:
    before = torch.backends.cudnn.benchmark
    with cudnn_benchmark():
        assert torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark == before


@pytest.mark.cuda
def test_the_card_autocasts_to_what_it_computes_natively() -> None:
    device = torch.device("cuda")
    major, _ = torch.cuda.get_device_capability(device)
    assert device_autocast_dtype(device) == (torch.bfloat16 if major >= 8 else torch.float16)
    with pytest.raises(ConfigError, match="cuda:N"):
        resolve_device("cuda:-1")
    with pytest.raises(ConfigError, match="only"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
