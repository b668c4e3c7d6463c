"""What a CPU can show of fine-tuning's GPU and multi-GPU paths (the device setting, the CUDA
random state a resume restores, Fast-AT under a loss scaler, SyncBatchNorm's swap, image
folders through the DataLoader), and checks marked `cuda` for a CUDA machine."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Subset

import engine.training.finetune as training
from engine.common.distributed import DistContext
from engine.common.errors import ConfigError
from engine.data.datasets import ImageTensorDataset, load_data
from engine.training.finetune import (
    _restore_rng,
    _rng_state,
    _Run,
    _SyncedBatchNorm,
    batchnorm_mode,
    finetune,
    saved_cuda_state,
)
from engine.training.finetune_config import FinetuneConfig


def bn_cnn(seed: int = 1) -> nn.Module:
    """Conv-BN-ReLU, conv-BN-ReLU, linear: BatchNorm but no dropout, so two runs can agree exactly."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    )


@pytest.fixture(scope="module")
def data():
    bundle = load_data("digits")
    return dataclasses.replace(bundle, train=Subset(bundle.train, range(128)), val=Subset(bundle.val, range(32)))


def config(**changes) -> FinetuneConfig:
    return dataclasses.replace(FinetuneConfig(epochs=2, lr=0.05, batch_size=32, device="cpu", eval_max_examples=32),
                               **changes)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- one device setting --------------------------------------------------------------------


def test_finetune_device_must_be_the_device_the_run_computes_on(data) -> None:
    on_cuda = DistContext(device=torch.device("cuda", 0))  # never computed on: the check comes first
    with pytest.raises(ConfigError, match=r"finetune.device 'cpu' differs from the device this run computes on \(cuda:0\)"):
        finetune(bn_cnn(), data, data.normalization, config(), None, ctx=on_cuda)
    result = finetune(bn_cnn(), data, data.normalization, config(epochs=1, device="auto"), None, ctx=DistContext())
    assert result.completed and result.device == "cpu" and result.batchnorm == "single process"


# ---- the CUDA random state in last.pt -------------------------------------------------------


def test_saved_cuda_state_is_the_device_in_use() -> None:
    one, two = torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)
    assert saved_cuda_state(one, 3) is one  # version 2: the state of the device that trained
    assert saved_cuda_state([one, two], 1) is two  # version 1: that device's entry ...
    assert saved_cuda_state([one, two], 5) is one  # ... or the first, on a machine with more devices
    assert saved_cuda_state([], 0) is None and saved_cuda_state(None, 0) is None


class OneGpu:
    """torch.cuda's random-state calls as on a machine with one GPU, recording what is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.set: list[tuple[int, torch.Tensor]] = []
        self.state = torch.arange(16, dtype=torch.uint8)
        cuda = torch.cuda

        def set_rng_state(state: torch.Tensor, device: object = "cuda") -> None:
            index = device.index if isinstance(device, torch.device) else int(str(device).partition(":")[2] or 0)
            if index >= 1:
                raise IndexError("list index out of range")  # what torch raises for a missing GPU
            self.set.append((index, state))

        def set_rng_state_all(states: list[torch.Tensor]) -> None:
            for index, state in enumerate(states):
                set_rng_state(state, torch.device("cuda", index))

        monkeypatch.setattr(cuda, "set_rng_state", set_rng_state)
        monkeypatch.setattr(cuda, "set_rng_state_all", set_rng_state_all)
        monkeypatch.setattr(cuda, "get_rng_state", lambda device="cuda": self.state)
        monkeypatch.setattr(cuda, "get_rng_state_all", lambda: [self.state, self.state + 1])
        monkeypatch.setattr(cuda, "current_device", lambda: 0)


def test_two_cuda_rng_states_resume_on_a_one_gpu_machine(data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    finetune(bn_cnn(), data, data.normalization, config(epochs=1), tmp_path)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["version"] == 2 and state["rng"]["cuda"] is None  # a CPU run has no CUDA state
    first, second = torch.full((16,), 7, dtype=torch.uint8), torch.full((16,), 9, dtype=torch.uint8)
    state["rng"]["cuda"] = [first, second]  # last.pt of a two-GPU machine, before version 2
    gpu = OneGpu(monkeypatch)
    _restore_rng(state["rng"], torch.device("cuda", 0))
    assert [(index, saved.tolist()) for index, saved in gpu.set] == [(0, first.tolist())]
    assert torch.equal(_rng_state(torch.device("cuda", 0))["cuda"], gpu.state)  # one state, not every GPU's


# ---- Fast-AT under a loss scaler ------------------------------------------------------------


def test_fastat_input_gradient_comes_from_the_unscaled_loss(data, monkeypatch: pytest.MonkeyPatch) -> None:
    model = bn_cnn()
    run = _Run(model, data, data.normalization, config(mode="fastat"), None, DistContext(), None, None, None, None)
    run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)  # what fp16 autocast on a pre-Ampere GPU uses
    x, y, _ = next(run.batches.epoch([torch.arange(16)]))
    seen: list[float] = []

    def spy(loss_of, images, eps, alpha, generator):
        seen.append(float(loss_of(images).detach()))
        return images

    monkeypatch.setattr(training, "fgsm_random_start", spy)
    with torch.no_grad():
        expected = float(F.cross_entropy(run.core(x), y, reduction="sum"))
    run._step(x, y, 1 / 16, torch.Generator())
    assert seen == [pytest.approx(expected, rel=1e-6)]
    run.close()


# ---- BatchNorm under DDP --------------------------------------------------------------------


def test_synced_batchnorm_swaps_in_and_gives_back_the_trained_layers() -> None:
    model = bn_cnn()
    originals = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    synced = _SyncedBatchNorm(model)
    assert [type(m) for m in model if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [nn.SyncBatchNorm] * 2
    assert model[1].weight is originals[0].weight  # shared: the optimiser's parameters stay the model's
    with torch.no_grad():
        model[1].weight.add_(1.0)
        model[4].running_mean.fill_(0.25)
    model[4].num_batches_tracked += 3
    synced.restore()
    assert [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == originals
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert torch.equal(model[4].running_mean, torch.full((8,), 0.25)) and int(model[4].num_batches_tracked) == 3
    assert float(model[1].weight.detach().min()) == 2.0


def test_batchnorm_mode_says_whether_statistics_are_synchronised() -> None:
    assert batchnorm_mode(DistContext(), 2) == "single process"
    assert batchnorm_mode(DistContext(0, 2, torch.device("cuda", 0)), 2).startswith("synchronised over 2 processes")
    assert batchnorm_mode(DistContext(0, 2, torch.device("cpu")), 2).startswith("per process: SyncBatchNorm needs CUDA")
    assert batchnorm_mode(DistContext(0, 2, torch.device("cpu")), 0) == "no BatchNorm layers"


# ---- image folders through the DataLoader -----------------------------------------------------


def test_an_image_folder_trains_as_the_same_images_held_in_memory(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    for name in ("a", "b", "c", "d"):
        (tmp_path / name).mkdir()
        for i in range(16):
            pixels = torch.randint(0, 256, (32, 32), dtype=torch.uint8, generator=generator).numpy()
            Image.fromarray(pixels, mode="L").save(tmp_path / name / f"{i}.png")
    files = load_data(f"imagefolder:{tmp_path}", channels=1)
    items = [files.train[i] for i in range(len(files.train))]
    held = ImageTensorDataset(torch.stack([image for image, _ in items]), [label for _, label in items], 1, 32)
    memory = dataclasses.replace(files, train=held)
    cfg = config(augment=True, eval_max_examples=8)
    from_files, from_memory = bn_cnn(), bn_cnn()
    a = finetune(from_files, files, files.normalization, cfg, None)
    b = finetune(from_memory, memory, files.normalization, cfg, None)
    assert same_weights(from_files, from_memory)
    assert [r.train_loss for r in a.history] == [r.train_loss for r in b.history]


# ---- on a CUDA machine ------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["standard", "fastat", "asam"])
def test_each_mode_trains_on_the_gpu_with_amp(data, mode: str) -> None:
    model = bn_cnn()
    result = finetune(model, data, data.normalization, config(mode=mode, device="cuda", epochs=3), None)
    losses = [r.train_loss for r in result.history]
    assert result.completed and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.cuda
def test_a_two_gpu_last_pt_resumes_on_this_gpu(data, tmp_path: Path) -> None:
    cfg = config(device="cuda", epochs=2)
    finetune(bn_cnn(), data, data.normalization, dataclasses.replace(cfg, epochs=1), tmp_path)
    path = tmp_path / "last.pt"
    state = torch.load(path, weights_only=True)
    assert isinstance(state["rng"]["cuda"], torch.Tensor)
    state["config"]["epochs"] = 2
    state["rng"]["cuda"] = [state["rng"]["cuda"]] * (torch.cuda.device_count() + 1)  # more GPUs than here
    torch.save(state, path)
    result = finetune(bn_cnn(), data, data.normalization, cfg, tmp_path, resume=True)
    assert result.completed and [r.epoch for r in result.history] == [1, 2]


@pytest.mark.cuda
def test_a_gpu_epoch_synchronises_per_epoch_not_per_step(data) -> None:
    """The host waits for the GPU a fixed number of times per epoch (its end), not per step:
    a 6-step epoch warns of no more synchronisations than a 2-step one."""

    def synchronisations(images: int) -> int:
        bundle = dataclasses.replace(data, train=Subset(data.train, range(images)))
        run = _Run(bn_cnn(), bundle, data.normalization, config(device="cuda", mode="asam"), None,
                   DistContext(device=torch.device("cuda")), None, None, None, None)
        run.train_epoch(0)  # cuDNN's autotuner and lazy initialisation synchronise on first use
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run.train_epoch(1)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        run.close()
        return sum("synchroniz" in str(w.message) for w in caught)

    assert synchronisations(6 * 32) <= synchronisations(2 * 32)


# ---- the GPU step's mixed precision, channels-last and compile, run on the CPU --------------------


def test_the_bfloat16_channels_last_step_runs_on_the_cpu(data) -> None:
    """What `amp` and `channels_last` switch on for a CUDA run (they stay off on a CPU run), here
    forced on for a CPU run: the forward computes in bfloat16 on channels-last inputs, and the
    epoch's loss stays close to the float32 one."""
    losses = {}
    for amp in (False, True):
        model = bn_cnn()
        run = _Run(model, data, data.normalization, config(amp=False, augment=False), None, DistContext(), None, None,
                   None, None)
        if amp:
            run.amp_dtype, run.channels_last = torch.bfloat16, True
            model.to(memory_format=torch.channels_last)
        seen: list[tuple[torch.dtype, bool]] = []
        model[3].register_forward_hook(lambda _m, args, out: seen.append(  # 8 channels: the layouts differ
            (out.dtype, args[0].is_contiguous(memory_format=torch.channels_last))))
        losses[amp] = run.train_epoch(0).train_loss
        run.close()
        assert set(seen) == ({(torch.bfloat16, True)} if amp else {(torch.float32, False)})
    assert losses[True] == pytest.approx(losses[False], rel=0.05) and losses[True] != losses[False]


def test_compiled_fine_tuning_trains_like_the_eager_one(data, monkeypatch: pytest.MonkeyPatch) -> None:
    """`finetune.compile` through TorchDynamo on a tiny model; the aot_eager backend traces and
    runs the graphs without Inductor's C++ build (35 s for a tiny model on this CPU)."""
    compiled_calls: list[str] = []
    real_compile = torch.compile

    def compile_here(module, **kwargs):
        compiled_calls.append(type(module).__name__)
        return real_compile(module, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_here)
    results = {}
    for compile_ in (False, True):
        model = bn_cnn()
        result = finetune(model, data, data.normalization, config(epochs=1, compile=compile_, augment=False), None)
        results[compile_] = (result.history[0].train_loss, model.state_dict())
    assert compiled_calls == ["Sequential"]
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-4)
    eager, compiled = results[False][1], results[True][1]
    assert eager.keys() == compiled.keys()  # the compiled wrapper leaves the model's own names alone
    assert all(torch.allclose(eager[k].float(), compiled[k].float(), atol=1e-4) for k in eager)
