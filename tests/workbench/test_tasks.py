"""The TUI's background jobs share the session's models: pruning and evaluation must never move
a shared model to another device or switch its mode (a concurrent job may be reading it; on a
GPU that is "Expected all tensors on the same device"). Shown here by watching every `.to()`,
`.train()` and `.eval()` on the shared models while the jobs run, one after the other and at
the same time."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.common.progress import Progress
from engine.pipeline import Workspace, with_data
from workbench import tasks
from workbench.app import build_config
from workbench.jobs import JobDelivered, ProgressRelay


@pytest.fixture
def watched(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[set[int], list[str]]]:
    """Ids of models to watch, and the calls that moved them or switched their mode."""
    ids: set[int] = set()
    calls: list[str] = []
    apply, train = nn.Module._apply, nn.Module.train

    def watched_apply(self: nn.Module, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        if id(self) in ids:
            calls.append(f"{type(self).__name__}._apply")
        return apply(self, fn, *args, **kwargs)

    def watched_train(self: nn.Module, mode: bool = True) -> nn.Module:
        if id(self) in ids:
            calls.append(f"{type(self).__name__}.train({mode})")
        return train(self, mode)

    monkeypatch.setattr(nn.Module, "_apply", watched_apply)
    monkeypatch.setattr(nn.Module, "train", watched_train)
    yield ids, calls


def _progress(_: Progress) -> None:
    pass


def _relay() -> ProgressRelay:
    """A job's progress relay whose messages go nowhere."""
    return ProgressRelay(0, lambda _: None)


def _open(config) -> Workspace:  # type: ignore[no-untyped-def]
    """The model as the open job hands it over, with the data the job then loads."""
    posted: list[object] = []
    loaded = tasks.open_model(config, ProgressRelay(0, posted.append), threading.Event())
    opened = next(m.part for m in posted if isinstance(m, JobDelivered) and isinstance(m.part, tasks.Opened))
    assert loaded is not None and loaded.data is not None
    return with_data(opened.workspace, loaded.data)


def test_prune_and_evaluate_jobs_leave_the_shared_models_alone(checkpoint: Path, watched) -> None:
    config = build_config(None, {
        "model.checkpoint": str(checkpoint), "data.spec": "digits", "run.device": "cpu", "finetune.device": "cpu",
        "data.image_size": 16, "prune.recalibrate_images": 64,
        "evaluate.max_examples": 8, "evaluate.frequency": False, "evaluate.corruption": False,
        "evaluate.attacks": ["fgsm:eps=0.01"], "deploy.form": "grouped",
    })
    ws = _open(config)
    ids, calls = watched
    original = ws.model
    mode = original.training
    ids.add(id(original))
    pruned = tasks.prune_model(ws, None, _progress, threading.Event()).outcome.model
    ids.add(id(pruned))
    shared = {"unpruned": original, "pruned": pruned}
    before = {label: {k: v.clone() for k, v in m.state_dict().items()} for label, m in shared.items()}
    tasks.evaluate_models(ws, shared, _relay(), threading.Event())
    assert calls == []

    failures: list[BaseException] = []

    def job(run) -> None:  # type: ignore[no-untyped-def]
        try:
            run()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=job, args=(lambda: tasks.prune_model(ws, None, _progress, threading.Event()),)),
               threading.Thread(target=job, args=(lambda: tasks.evaluate_models(ws, shared, _relay(),
                                                                               threading.Event()),))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and calls == []
    assert original.training == mode
    for label, model in shared.items():
        assert all(torch.equal(v, before[label][k]) for k, v in model.state_dict().items())
