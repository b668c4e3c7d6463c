"""Command line: `gkp-workbench [CHECKPOINT]` opens the TUI; with `--batch` it runs the pipeline
headless for scripts. Flags override the TOML config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from engine.common.errors import WorkbenchError
from engine.config import DEPLOY_FORMS, RunConfig
from engine.gkp.prune_config import COMPAT_VALUES, METHODS
from engine.itp.itp_config import GRANULARITIES
from engine.training.finetune_config import MODES

from .exit_codes import EXIT_BAD_INPUT


class _Parser(argparse.ArgumentParser):
    """argparse that exits with the bad-input code 2 and one line of usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"error: {message}\n")


def _default(dotted: str) -> str:
    """The documented default of a config key, as `--help` shows it."""
    table, _, key = dotted.partition(".")
    value = getattr(getattr(RunConfig(), table), key)
    if isinstance(value, (list, tuple)):
        sep = ";" if table == "evaluate" else ","
        return sep.join(str(v) for v in value) or "none"
    return "none" if value in ("", None) else str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gkp-workbench",
        description="Grouped kernel pruning workbench: inspect, prune, fine-tune and attack CNNs. "
        "Without --batch it opens the interactive workbench.",
        epilog="Exit codes (batch): 0 ok, 2 bad input, config or environment (paths, permissions, full disk, "
        "a run folder in use), 130 interrupted (resumable), 1 internal error (traceback in OUT/log.txt). "
        "Docs: README.md.",
    )

    def option(flag: str, key: str, text: str, **kwargs: Any) -> None:
        parser.add_argument(flag, help=f"{text} (default: {_default(key)})", **kwargs)

    parser.add_argument("checkpoint", nargs="?", help="checkpoint to open (default: the bundled sample model)")
    parser.add_argument("--batch", action="store_true", help="run the pipeline headless instead of opening the TUI")
    parser.add_argument("--config", type=Path, help="TOML run configuration; flags override it (default: none)")
    parser.add_argument("--out", type=Path, help="output directory for batch mode (default: the next free runs/<checkpoint name>-N)")
    parser.add_argument("--force", action="store_true", help="replace the previous run in the output directory: only "
                        "the files its .gkp-run.json lists, and only once the new run starts writing")
    parser.add_argument("--resume", type=Path, metavar="DIR", help="continue an interrupted batch run in DIR (default: none, start a new run)")
    parser.add_argument("--json", action="store_true", help="print the report JSON on stdout instead of the summary")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr (batch mode)")
    option("--stages", "run.stages", "comma-separated subset of warmup,prune,finetune,evaluate (warmup: AdaSAP)")
    option("--method", "prune.method", "pruning method", choices=list(METHODS))
    option("--granularity", "itp.granularity", "in-train pruning (itp) mask granularity", choices=list(GRANULARITIES))
    option("--itp-epochs", "itp.epochs", "in-train pruning (itp) training epochs", type=int)
    option("--hw-weight", "itp.hw_weight", "in-train pruning (itp) hardware-loss weight b", type=float)
    option("--warmup-epochs", "warmup.epochs", "AdaSAP warmup epochs (with --stages warmup,...)", type=int)
    parser.add_argument("--grouping", help="override stage-1 grouping for ablations: smoothness-snaking, tmi, random, "
                        "cluster:kpca|spectral|tsne-dbscan (default: the method's own)")
    parser.add_argument("--selection", help="override stage-2 selection for ablations: smooth-beam, greedy, l2, "
                        "least-smooth, random (default: the method's own)")
    option("--rate", "prune.rate", "fraction of grouped kernels to prune", type=float)
    option("--groups", "prune.groups", "filter groups per layer", type=int)
    option("--compat", "prune.compat", "reproduce the authors' code where it differs", choices=list(COMPAT_VALUES))
    option("--snapshots", "model.snapshots", "folder of per-epoch training snapshots for TMI-GKP; the bundled sample brings its own")
    option("--data", "data.spec", "digits | cifar10:PATH | imagefolder:PATH")
    parser.add_argument("--normalize", help="input normalisation: cifar10 | imagenet | none | MEAN,STD | m1,m2,m3/s1,s2,s3 "
                        "(default: the one stored in the checkpoint)")
    parser.add_argument("--arch", help="architecture override, e.g. resnet56, vgg16_bn, torchvision:resnet50, "
                        "pkg.mod:factory (default: inferred from the weights)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow code that files name: full unpickling of "
                        "whole-model files, model factories stored in checkpoints")
    option("--form", "deploy.form", "deployed form of pruned layers", choices=list(DEPLOY_FORMS))
    option("--epochs", "finetune.epochs", "fine-tuning epochs", type=int)
    option("--mode", "finetune.mode", "fine-tuning mode", choices=list(MODES))
    option("--attacks", "evaluate.attacks", "semicolon-separated attacks, e.g. 'fgsm:eps=0.01;pgd:eps=8/255,alpha=2/255,steps=3'")
    parser.add_argument("--max-examples", type=int, help="evaluate on at most N test examples (default: 0 = all)")
    option("--device", "run.device", "auto | cpu | cuda | cuda:N")
    option("--seed", "run.seed", "seed for pruning, data split and fine-tuning", type=int)
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Map the given flags onto dotted config keys."""
    simple = {
        "checkpoint": "model.checkpoint", "snapshots": "model.snapshots", "normalize": "model.normalize",
        "arch": "model.arch", "data": "data.spec", "method": "prune.method", "grouping": "prune.grouping",
        "selection": "prune.selection", "rate": "prune.rate", "groups": "prune.groups",
        "compat": "prune.compat", "form": "deploy.form", "epochs": "finetune.epochs",
        "mode": "finetune.mode", "max_examples": "evaluate.max_examples", "granularity": "itp.granularity",
        "itp_epochs": "itp.epochs", "hw_weight": "itp.hw_weight", "warmup_epochs": "warmup.epochs",
    }
    out: dict[str, Any] = {key: getattr(args, flag) for flag, key in simple.items() if getattr(args, flag) is not None}
    if args.trust_pickle:
        out["model.trust_pickle"] = True
    if args.stages is not None:
        out["run.stages"] = [s.strip() for s in args.stages.split(",") if s.strip()]
    if args.attacks is not None:
        out["evaluate.attacks"] = [a.strip() for a in args.attacks.split(";") if a.strip()]
    if args.seed is not None:
        out.update({"run.seed": args.seed, "prune.seed": args.seed, "finetune.seed": args.seed})
    if args.device is not None:
        out.update({"run.device": args.device, "finetune.device": args.device})
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch or args.resume:
        from .batch import run_from_args

        return run_from_args(args, overrides_from_args(args))
    try:
        from .app import run_app

        return run_app(args, overrides_from_args(args))
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
