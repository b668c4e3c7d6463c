"""Two CPU processes under torchrun (gloo) against one process: sharded evaluation and probe
counts match exactly, and a fine-tune matches to float tolerance (the model has no BatchNorm or
dropout, whose per-process statistics and draws legitimately differ). In the same run: a cancel
on rank 0 alone stops every rank at the same step (and at an evaluation's merge), the stopped
run resumes to the uninterrupted weights, and only rank 0 plans the pruning."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from engine.common.devices import exact_fp32
from engine.common.distributed import DistContext, shard
from engine.common.errors import Cancelled
from engine.robustness.attacks import evaluate_robustness
from engine.robustness.probes import corruption_probe, frequency_probe
from engine.robustness.sharded import evaluate_sharded
from engine.training.finetune import finetune

# Weights may differ by float summation order (gradients are averaged across processes).
WEIGHT_TOLERANCE = 1e-5

SETUP = '''
import dataclasses
import torch
from torch import nn
from torch.utils.data import Subset
from engine.data.datasets import load_data
from engine.training.finetune_config import FinetuneConfig


def build() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
    )


def build_bn() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    )


def setup(device: str = "cpu"):
    bundle = load_data("digits")
    data = dataclasses.replace(bundle, train=Subset(bundle.train, range(100)), val=Subset(bundle.val, range(40)))
    config = FinetuneConfig(epochs=2, lr=0.05, batch_size=32, device=device, eval_max_examples=33,
                            track_attacks=["fgsm:eps=0.1"], amp=False, channels_last=False)
    return data, config
'''

GPU_SCRIPT = '''
import sys
from pathlib import Path
import torch
from engine.common.devices import exact_fp32
from engine.common.distributed import DistContext
from engine.training.finetune import finetune
from tinysetup import build_bn, setup

out = Path(sys.argv[1])
ctx = DistContext.from_env("cuda")
data, config = setup("cuda")
model = build_bn()
with exact_fp32():
    result = finetune(model, data, data.normalization, config, None)
if ctx.is_main:
    torch.save(model.state_dict(), out / "weights.pt")
    (out / "batchnorm.txt").write_text(result.batchnorm)
ctx.close()
'''

SCRIPT = '''
import json, os, sys, threading
from pathlib import Path
import torch
import engine.pipeline as pipeline
from engine.common.distributed import DistContext
from engine.common.errors import Cancelled
from engine.config import RunConfig
from engine.robustness.sharded import corruption_sharded, evaluate_sharded, frequency_sharded
from engine.training.finetune import finetune
from sample_models import use_sample_when_unset
from tinysetup import build, setup

out = Path(sys.argv[1])
ctx = DistContext.from_env("cpu")
data, config = setup()
model = build()
report = evaluate_sharded(model, data.normalization, data.test, ["fgsm:eps=0.1"], ctx=ctx, device="cpu",
                          max_examples=101)
frequency = frequency_sharded(model, data.normalization, data.test, ctx=ctx, device="cpu", max_examples=101,
                              thresholds=(4, 8))
contrast = corruption_sharded(model, data.normalization, data.test, ctx=ctx, device="cpu", max_examples=101,
                              corruptions=["contrast"], severities=(1, 5))
cancel = threading.Event()
if ctx.is_main:
    cancel.set()  # rank 0 alone is cancelled: every rank must stop, none may wait for it at the merge
try:
    evaluate_sharded(model, data.normalization, data.test, [], ctx=ctx, device="cpu", cancel=cancel)
    evaluation = "finished"
except Cancelled:
    evaluation = "cancelled"

result = finetune(model, data, data.normalization, config, out / "run")

stop = threading.Event()
def stop_in_epoch_two(p):  # progress reaches rank 0 only
    if (p.metrics.get("epoch"), p.metrics.get("step")) == (2, 2):
        stop.set()
cut = finetune(build(), data, data.normalization, config, out / "cut", progress=stop_in_epoch_two, cancel=stop)
resumed = build()
finetune(resumed, data, data.normalization, config, out / "cut", resume=True)
same = all(torch.equal(v, model.state_dict()[k]) for k, v in resumed.state_dict().items())

calls = []
planner = pipeline.plan_pruning
pipeline.plan_pruning = lambda *args, **kwargs: calls.append(ctx.rank) or planner(*args, **kwargs)
run_config = RunConfig()
run_config.set("run.device", "cpu")
run_config.set("run.stages", ["prune"])
run_config.set("deploy.form", "grouped")
use_sample_when_unset(run_config)
outcome = pipeline.prune(pipeline.open_workspace(run_config))

checks = ctx.all_gather({"evaluation": evaluation, "cut": [cut.completed, len(cut.history)],
                         "resumed_equals_uninterrupted": same, "plan_calls": len(calls),
                         "plan": outcome.plan.to_json()})
if ctx.is_main:
    torch.save(model.state_dict(), out / "weights.pt")
    summary = {
        "world": ctx.world_size,
        "eval": [report.n_examples, report.clean_correct, [a.correct for a in report.attacks]],
        "frequency": [frequency.n_examples, frequency.clean_correct,
                      [[r.low_correct, r.high_correct] for r in frequency.rows]],
        "contrast": [contrast.n_examples, [r.correct for r in contrast.results]],
        "losses": [r.train_loss for r in result.history],
        "val": [r.val for r in result.history],
        "files": sorted(os.listdir(out / "run")),
        "checks": checks,
    }
    (out / "summary.json").write_text(json.dumps(summary))
ctx.close()
'''


def _load_setup(folder: Path):
    (folder / "tinysetup.py").write_text(SETUP)
    spec = importlib.util.spec_from_file_location("tinysetup", folder / "tinysetup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shard_is_strided_and_single_process_context_is_plain() -> None:
    ctx = DistContext.from_env("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    assert ctx.all_reduce_sum([1, 2.5]) == [1.0, 2.5] and ctx.all_gather("x") == ["x"]
    assert ctx.broadcast_object({"a": 1}) == {"a": 1}
    cancel = threading.Event()
    assert not ctx.any_set(cancel) and not ctx.any_set(None)
    cancel.set()
    assert ctx.any_set(cancel)
    with pytest.raises(Cancelled):
        ctx.check_cancel(cancel)
    second = DistContext(rank=1, world_size=3)
    assert list(shard(list(range(10)), 8, second)) == [1, 4, 7]


def _torchrun(folder: Path, script: str) -> None:
    """Run `script` in two processes under torchrun, with this checkout and `folder` importable."""
    (folder / "run_dist.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(folder / "run_dist.py"), str(folder)],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_match_one(tmp_path: Path) -> None:
    setup = _load_setup(tmp_path)
    _torchrun(tmp_path, SCRIPT)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world"] == 2
    assert summary["files"] == ["best_benign.pt", "best_fgsm-0.1.pt", "last.pt"]

    data, config = setup.setup()
    model = setup.build()
    ctx = DistContext.from_env("cpu")
    single = evaluate_robustness(model, data.normalization, data.test, ["fgsm:eps=0.1"], device="cpu", max_examples=101)
    assert evaluate_sharded(model, data.normalization, data.test, ["fgsm:eps=0.1"], ctx=ctx, device="cpu",
                            max_examples=101).clean_correct == single.clean_correct
    assert summary["eval"] == [101, single.clean_correct, [single.attacks[0].correct]]
    frequency = frequency_probe(model, data.normalization, data.test, thresholds=(4, 8), device="cpu", max_examples=101)
    assert summary["frequency"] == [101, frequency.clean_correct, [[r.low_correct, r.high_correct] for r in frequency.rows]]
    contrast = corruption_probe(model, data.normalization, data.test, ["contrast"], (1, 5), device="cpu", max_examples=101)
    assert summary["contrast"] == [101, [r.correct for r in contrast.results]]

    first, second = summary["checks"]
    assert first["evaluation"] == second["evaluation"] == "cancelled"
    assert first["cut"] == second["cut"] == [False, 1]  # both stopped in epoch 2, neither hung
    assert first["resumed_equals_uninterrupted"] and second["resumed_equals_uninterrupted"]
    assert (first["plan_calls"], second["plan_calls"]) == (1, 0)  # rank 0 planned, rank 1 received
    assert first["plan"] == second["plan"]

    result = finetune(model, data, data.normalization, config, tmp_path / "single")
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    worst = max(float((weights[k] - v).abs().max()) for k, v in model.state_dict().items())
    assert worst < WEIGHT_TOLERANCE
    assert summary["losses"] == pytest.approx([r.train_loss for r in result.history], rel=1e-5)
    for theirs, ours in zip(summary["val"], (r.val for r in result.history)):
        assert theirs == pytest.approx(ours, abs=1 / 33 + 1e-9)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_synchronise_batchnorm_and_match_one(tmp_path: Path) -> None:
    """With BatchNorm, two GPUs (16 images each) train as one GPU on the 32-image batch only
    when the batch statistics are synchronised."""
    setup = _load_setup(tmp_path)
    _torchrun(tmp_path, GPU_SCRIPT)
    assert (tmp_path / "batchnorm.txt").read_text().startswith("synchronised over 2 processes")
    data, config = setup.setup("cuda")
    model = setup.build_bn()
    with exact_fp32():
        finetune(model, data, data.normalization, config, None)
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    worst = max(float((weights[k].float() - v.float()).abs().max()) for k, v in model.state_dict().items())
    assert worst < 1e-4
