"""The batch report (`report.json`): a versioned, documented record of one run — model, pruning,
deployment, fine-tuning, evaluation and the environment it ran in. Schema: docs/REPORT.md."""

from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from typing import TYPE_CHECKING, Any

import torch

from .models.metrics import MAC_COUNTER

if TYPE_CHECKING:
    from .pipeline import Workspace

REPORT_SCHEMA = "gkp-workbench/report"
REPORT_VERSION = 2
_PACKAGES = ("torch", "torchvision", "torchattacks", "numpy", "scipy", "scikit-learn", "gkp-workbench")


def environment(device: torch.device, seed: int) -> dict[str, Any]:
    """Versions, device and seed: what someone needs to reproduce or compare the numbers."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "device": str(device),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
    }
    return info


def build_report(ws: "Workspace", results: dict[str, Any], completed: list[str]) -> dict[str, Any]:
    """Assemble the report from the stage results gathered so far."""
    cost = ws.cost
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "version": REPORT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "stages_completed": list(completed),
        "model": {
            "checkpoint": str(ws.checkpoint.path),
            "arch": ws.checkpoint.arch.describe(),
            "arch_spec": ws.checkpoint.arch.to_dict(),
            "source_format": ws.checkpoint.source_format,
            "params": cost.params,
            "macs": cost.macs,
            "input_shape": list(ws.input_shape),
            "mac_counter": MAC_COUNTER,
            "normalization": {**ws.normalization.to_dict(), "source": ws.normalization_source},
        },
        "data": data_section(ws),
        "environment": environment(ws.device, ws.config.run.seed),
    }
    for stage in ("warmup", "prune", "deploy", "finetune", "sharpness", "evaluate"):
        if stage in results:
            report[stage] = results[stage]
    report["warnings"] = collected_warnings(results)
    return report


def data_section(ws: "Workspace") -> dict[str, Any] | None:
    """The data as configured and as split (None when the run had none)."""
    data = ws.data
    if data is None:
        return None
    return {
        "spec": ws.config.data.spec,
        "source": ws.data_source,
        "name": data.name,
        "n_train": len(data.train),  # type: ignore[arg-type]
        "n_val": len(data.val),  # type: ignore[arg-type]
        "n_test": len(data.test),  # type: ignore[arg-type]
        "val_fraction": ws.config.data.val_fraction,
        "split_seed": ws.config.run.seed,
        "num_classes": data.num_classes,
        "classes": list(data.classes),
        "image_size": data.image_size,
        "channels": data.in_channels,
    }


def collected_warnings(results: dict[str, Any]) -> list[str]:
    """Every stage's warnings, in stage order, each once."""
    evaluation = results.get("evaluate") or {}
    sources = [results.get("prune") or {}, evaluation, evaluation.get("baseline") or {}]
    return list(dict.fromkeys(w for section in sources for w in section.get("warnings", [])))
