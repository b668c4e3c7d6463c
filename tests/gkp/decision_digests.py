"""Golden digests of pruning decisions: for every method, ablation pairing and compat mode on
several models and seeds (the bundled sample with its snapshot archive, ../shared's ResNet-20
when present, seeded random CIFAR ResNets, a model with 1x1 convs), the SHA-256 of the plan's
decisions (kept sets, filter groups, scores, skipped layers: the plan JSON without its settings)
and of the decision trace as `decisions.jsonl` held it in trace version 1 (version 2 stores beam
cuts by column; `version_1_line` expands them, and every case checks that the version-2 lines read
back as the same events).

`test_same_decisions.py` recomputes every case and compares. The golden file is generated, never
edited by hand: `python tests/gkp/decision_digests.py --write` (from the repository root, with
PYTHONPATH set to it) rewrites `golden/decisions.json` from whatever engine is on the path, so run
it only on code whose decisions are the reference."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden" / "decisions.json"
SHARED_CHECKPOINT = REPO.parent / "shared" / "checkpoints" / "cifar10_resnet20_dp-wrapped.th"


@dataclass(frozen=True)
class Case:
    """One planning run: a model (by name), the PruneConfig fields that differ from the default,
    and synthetic ticket epochs for models without real snapshots."""

    model: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        settings = ",".join(f"{k}={v}" for k, v in sorted(self.config.items()))
        return f"{self.model}[{settings}]"


def _seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return factory().eval()


def _with_pointwise() -> nn.Module:
    """Convs of several widths, one that 4 groups cannot divide, and a 1x1 conv."""
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                         nn.Conv2d(32, 24, 3), nn.Conv2d(24, 10, 3), nn.Conv2d(10, 16, 1))


@cache
def load_model(name: str) -> tuple[nn.Module, dict[int, dict[str, torch.Tensor]] | None]:
    """The model and its ticket snapshots (the sample's real ones, else synthetic: the final
    weights plus seeded noise shrinking towards the last epoch)."""
    from engine.models.cifar_resnet import CifarResNet

    if name == "sample":
        from engine.formats.checkpoints import load_checkpoint
        from engine.formats.snapshots import load_snapshots
        from sample_models import SAMPLE_CHECKPOINT, SAMPLE_SNAPSHOTS

        loaded = load_checkpoint(SAMPLE_CHECKPOINT)
        snapshots = load_snapshots(SAMPLE_SNAPSHOTS, reference=loaded.state_dict, window=(35, 70))
        return loaded.model, snapshots
    if name == "shared-resnet20":
        state = torch.load(SHARED_CHECKPOINT, map_location="cpu", weights_only=True)["state_dict"]
        model = CifarResNet(20)
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        return model.eval(), _synthetic_snapshots(model, range(35, 41), seed=7)
    family, _, seed = name.partition("-seed")
    factories: dict[str, Callable[[], nn.Module]] = {
        "resnet8": lambda: CifarResNet(8), "resnet20": lambda: CifarResNet(20), "pointwise": _with_pointwise,
    }
    model = _seeded(factories[family], int(seed))
    return model, _synthetic_snapshots(model, range(2, 8), seed=int(seed))


def _synthetic_snapshots(model: nn.Module, epochs: range, seed: int) -> dict[int, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    final = model.state_dict()
    return {
        epoch: {k: v + 0.02 * (epochs.stop - epoch) * torch.randn(v.shape, generator=generator)
                if v.is_floating_point() else v for k, v in final.items()}
        for epoch in epochs
    }


def _tickets(model: str) -> dict[str, Any]:
    """The ticket window a model's snapshots cover."""
    if model == "sample":
        return {}
    return {"ticket_window": (35, 37)} if model == "shared-resnet20" else {"ticket_window": (2, 7)}


def cases(include_shared: bool = True) -> list[Case]:
    """Every golden case, in a fixed order."""
    from engine.gkp.prune_config import CLUSTER_PREFIX, GROUPINGS, SELECTIONS

    out: list[Case] = []
    models = ["sample", "resnet8-seed0", "resnet8-seed1", "resnet20-seed2"]
    if include_shared:
        models.insert(1, "shared-resnet20")
    for compat in ("paper", "reference"):
        for model in models:
            out.append(Case(model, {"compat": compat}))
        for model in ("sample", "shared-resnet20", "resnet8-seed0", "resnet8-seed1"):
            if model in models:
                out.append(Case(model, {"compat": compat, "method": "tmi-gkp", **_tickets(model)}))
        out.append(Case("sample", {"compat": compat, "rate": 0.25}))
        out.append(Case("resnet8-seed1", {"compat": compat, "rate": 0.7, "method": "tmi-gkp",
                                          **_tickets("resnet8-seed1")}))
        for grouping in GROUPINGS:
            clustered = grouping == "tmi" or grouping.startswith(CLUSTER_PREFIX)
            for selection in ("greedy",) if clustered else SELECTIONS:
                extra = _tickets("resnet8-seed0") if grouping == "tmi" else {}
                out.append(Case("resnet8-seed0", {"compat": compat, "grouping": grouping, "selection": selection,
                                                  "seed": 3, **extra}))
        out.append(Case("resnet8-seed0", {"compat": compat, "trace_level": "full"}))
        out.append(Case("resnet8-seed1", {"compat": compat, "beam_width": 3, "check_every": 2, "csb_alpha": 0.5,
                                          "rate": 0.25}))
        out.append(Case("resnet8-seed1", {"compat": compat, "method": "tmi-gkp", "gamma_ratio": 0.5,
                                          "beta": 0.3, **_tickets("resnet8-seed1")}))
        out.append(Case("pointwise-seed4", {"compat": compat, "include_pointwise": True, "groups": 4,
                                            "rate": 0.25}))
        out.append(Case("pointwise-seed4", {"compat": compat, "include_pointwise": True, "groups": 4,
                                            "selection": "greedy", "grouping": "random", "seed": 5}))
    for seed in (0, 1, 2):
        out.append(Case("resnet20-seed2", {"grouping": "random", "selection": "random", "seed": seed}))
    for seed in (0, 1):
        out.append(Case("resnet20-seed2", {"grouping": "cluster:spectral", "seed": seed}))
    return out


def _config(case: Case) -> Any:
    from engine.gkp.prune_config import PruneConfig

    settings = dict(case.config)
    if "ticket_window" in settings:
        settings["ticket_window"] = tuple(settings["ticket_window"])
    return PruneConfig(**settings)


def touches_issue_13(case: Case) -> bool:
    """Whether the case reaches a layer where compat `reference` behaves differently once the
    reference code's last two quirks are reproduced (SPEC §4.1, §4.2): a beam whose `S - 1` is a
    multiple of `check_every`, or greedy with `gamma_ratio * S < 1`. Golden cases must not."""
    from engine.gkp.layers import discover_layers

    config = _config(case)
    if config.compat != "reference":
        return False
    model, _ = load_model(case.model)
    layers = discover_layers(model, groups=config.groups, rate=config.rate, compat="reference",
                             skip_stem=config.skip_stem, include_pointwise=config.include_pointwise)
    for layer in layers:
        if not layer.eligible or layer.kept is None:
            continue
        if config.resolved_selection == "smooth-beam" and layer.kept > 1 and (layer.kept - 1) % config.check_every == 0:
            return True
        if config.resolved_selection == "greedy" and config.gamma_ratio * layer.kept < 1:
            return True
    return False


def version_1_line(event: Any) -> str:
    """The event's line as trace version 1 wrote it, whose digests the golden file holds: beam
    cuts listed every candidate whole (version 2 stores them by column)."""
    from engine.gkp.traces import BeamCut, event_line

    if not isinstance(event, BeamCut):
        return event_line(event)
    data = {"kind": event.kind, "layer": event.layer, "group": event.group, "start": event.start,
            "size": event.size, "beta": event.beta,
            "candidates": [{"added": c.added, "cost": c.cost, "members": c.members, "rank_cost": c.rank_cost,
                            "rank_smooth": c.rank_smooth, "score": c.score, "smoothness": c.smoothness,
                            "survived": c.survived} for c in event.candidates]}
    return json.dumps(data, sort_keys=True)


def run_case(case: Case) -> dict[str, Any]:
    """Plan the case and digest the plan (its layers and skipped layers) and the trace lines (in
    version 1's form, after checking that each line of the current form reads back as the same
    event)."""
    from engine.gkp.planner import plan_pruning
    from engine.gkp.traces import TraceEvent, event_line

    model, snapshots = load_model(case.model)
    events: list[Any] = []
    plan = plan_pruning(model, _config(case), snapshots=snapshots, on_event=events.append)
    if [TraceEvent.from_dict(json.loads(event_line(e))) for e in events] != events:
        raise AssertionError(f"{case.name}: the trace does not read back as the events written")
    trace = "".join(version_1_line(e) + "\n" for e in events).encode("utf-8")
    decisions = plan.to_dict()
    decisions.pop("params")  # the settings, which grow with new config keys; the rest is what was decided
    return {
        "decisions": hashlib.sha256(json.dumps(decisions, sort_keys=True).encode("utf-8")).hexdigest(),
        "trace": hashlib.sha256(trace).hexdigest(),
        "events": len(events),
        "kept": hashlib.sha256(json.dumps([l.kept_channels for l in plan.layers]).encode()).hexdigest()[:16],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {GOLDEN.relative_to(REPO)}")
    args = parser.parse_args(argv)
    if not SHARED_CHECKPOINT.is_file():
        parser.error(f"{SHARED_CHECKPOINT} is needed to write the golden file")
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for case in cases():
        if touches_issue_13(case):
            parser.error(f"case {case.name} reaches a compat-reference quirk; choose other settings")
        results[case.name] = run_case(case)
        print(case.name, results[case.name]["kept"], results[case.name]["events"], flush=True)
    if args.write:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({"cases": results}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {len(results)} cases to {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
