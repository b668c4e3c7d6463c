"""Two CPU processes under torchrun (gloo) against one process: sharded evaluation counts match
exactly, and a fine-tune matches to float tolerance (the model has no BatchNorm or dropout, whose
per-process statistics and draws legitimately differ)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.common.distributed import DistContext, shard
from engine.robustness.attacks import evaluate_robustness
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


def setup():
    bundle = load_data("digits")
    data = dataclasses.replace(bundle, train=Subset(bundle.train, range(100)), val=Subset(bundle.val, range(40)))
    config = FinetuneConfig(epochs=2, lr=0.05, batch_size=32, device="cpu", eval_max_examples=33,
                            track_attacks=["fgsm:eps=0.1"])
    return data, config
'''

SCRIPT = '''
import json, os, sys
from pathlib import Path
import torch
from engine.common.distributed import DistContext
from engine.robustness.sharded import evaluate_sharded
from engine.training.finetune import finetune
from tinysetup import build, setup

out = Path(sys.argv[1])
ctx = DistContext.from_env("cpu")
data, config = setup()
model = build()
report = evaluate_sharded(model, data.normalization, data.test, ["fgsm:eps=0.1"], ctx=ctx, device="cpu",
                          max_examples=101)
result = finetune(model, data, data.normalization, config, out / "run")
if ctx.is_main:
    torch.save(model.state_dict(), out / "weights.pt")
    summary = {
        "world": ctx.world_size,
        "eval": [report.n_examples, report.clean_correct, [a.correct for a in report.attacks]],
        "losses": [r.train_loss for r in result.history],
        "val": [r.val for r in result.history],
        "files": sorted(os.listdir(out / "run")),
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
    second = DistContext(rank=1, world_size=3)
    assert list(shard(list(range(10)), 8, second)) == [1, 4, 7]


def test_two_processes_match_one(tmp_path: Path) -> None:
    setup = _load_setup(tmp_path)
    (tmp_path / "run_dist.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(tmp_path / "run_dist.py"), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
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

    result = finetune(model, data, data.normalization, config, tmp_path / "single")
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    worst = max(float((weights[k] - v).abs().max()) for k, v in model.state_dict().items())
    assert worst < WEIGHT_TOLERANCE
    assert summary["losses"] == pytest.approx([r.train_loss for r in result.history], rel=1e-5)
    for theirs, ours in zip(summary["val"], (r.val for r in result.history)):
        assert theirs == pytest.approx(ours, abs=1 / 33 + 1e-9)
