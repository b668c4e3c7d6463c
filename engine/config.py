"""The run configuration shared by batch mode and the TUI: TOML sections mapped onto the
engine's own config dataclasses, with documented defaults and unknown keys rejected."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from .adasap.adasap_config import SharpnessConfig, WarmupConfig
from .common.checks import MAX_SEED, flag, one_of, texts, utf8, whole, wholes, within
from .common.devices import check_device
from .common.errors import ConfigError
from .common.fileio import write_text_atomic
from .gkp.prune_config import PruneConfig
from .itp.itp_config import ItpConfig
from .robustness.attack_spec import DEFAULT_ATTACKS, EPS_SPACES, AttackSpec
from .training.finetune_config import FinetuneConfig

STAGES: tuple[str, ...] = ("warmup", "prune", "finetune", "evaluate")
DEFAULT_STAGES: tuple[str, ...] = ("prune", "finetune", "evaluate")
DEPLOY_FORMS: tuple[str, ...] = ("grouped", "dense", "auto")
MAX_IMAGE_SIZE = 1024
MAX_LATENCY_BATCH = 1024
MAX_EVAL_BATCH = 65_536


@dataclass
class ModelSection:
    """Which checkpoint to open and how to read it; the front ends fill in the bundled sample when
    none is given."""

    checkpoint: str = ""
    arch: str = ""
    normalize: str = ""
    snapshots: str = ""
    trust_pickle: bool = False


@dataclass
class DataSection:
    """`digits`, `cifar10:PATH` or `imagefolder:PATH`, and how to split it. Empty means no data:
    the engine never guesses a dataset (the front ends fill in `digits` for the bundled sample),
    so recalibration and accuracy are skipped and fine-tuning and evaluation refuse to start."""

    spec: str = ""
    val_fraction: float = 0.1
    image_size: int = 0

    def validate(self) -> None:
        within("data.val_fraction", self.val_fraction, 0.0, 0.5, low_open=True, high_open=True)
        whole("data.image_size", self.image_size, 0, MAX_IMAGE_SIZE)


@dataclass
class DeploySection:
    """The deployed form of pruned layers and the batch size latency is measured at."""

    form: str = "auto"
    latency_batch: int = 1

    def validate(self) -> None:
        one_of("deploy.form", self.form, DEPLOY_FORMS)
        whole("deploy.latency_batch", self.latency_batch, 1, MAX_LATENCY_BATCH)


@dataclass
class EvaluateSection:
    """Attack suite (torchattacks names with parameters) and the probes run on the test split."""

    attacks: list[str] = field(default_factory=lambda: _default_attacks())
    eps_space: str = "pixel"
    max_examples: int = 0
    batch_size: int = 128
    baseline: bool = True
    frequency: bool = True
    thresholds: list[int] = field(default_factory=lambda: [4, 8, 12, 16])
    corruption: bool = True
    severities: list[int] = field(default_factory=lambda: [1, 3, 5])

    def validate(self) -> None:
        texts("evaluate.attacks", self.attacks)
        one_of("evaluate.eps_space", self.eps_space, EPS_SPACES)
        whole("evaluate.max_examples", self.max_examples, 0)
        whole("evaluate.batch_size", self.batch_size, 1, MAX_EVAL_BATCH)
        for name in ("baseline", "frequency", "corruption"):
            flag(f"evaluate.{name}", getattr(self, name))
        wholes("evaluate.thresholds", self.thresholds, 1, non_empty=self.frequency)
        wholes("evaluate.severities", self.severities, 1, 5, non_empty=self.corruption)


@dataclass
class RunSection:
    """Which stages run, on which device, with which seed (also the prune and fine-tune seed)."""

    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    device: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        texts("run.stages", self.stages, non_empty=True, distinct=True)
        for stage in self.stages:
            one_of("each of run.stages", stage, STAGES)
        check_device(self.device, "run.device")
        whole("run.seed", self.seed, 0, MAX_SEED)


def _default_attacks() -> list[str]:
    return list(DEFAULT_ATTACKS)


@dataclass
class RunConfig:
    """Every setting of one run, one attribute per TOML table."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    itp: ItpConfig = field(default_factory=ItpConfig)
    deploy: DeploySection = field(default_factory=DeploySection)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sharpness: SharpnessConfig = field(default_factory=SharpnessConfig)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)

    def validate(self) -> None:
        """Check every section; raise `ConfigError` for the first bad value."""
        for section in dataclasses.fields(self):
            values = getattr(self, section.name)
            for key in dataclasses.fields(values):
                utf8(f"{section.name}.{key.name}", getattr(values, key.name))
            validate = getattr(values, "validate", None)
            if validate is not None:
                validate()
        check_one_device(self.run.device, self.finetune.device)

    @property
    def adasap(self) -> bool:
        """Whether this is an AdaSAP run (it has a warmup stage)."""
        return "warmup" in self.run.stages

    def finetune_settings(self) -> FinetuneConfig:
        """The fine-tune stage's settings: `[finetune]`, except that an AdaSAP run's robustness
        phase (SPEC §9, `warmup.robust_finetune`) is ASAM at `warmup.robust_rho`."""
        if self.adasap and self.warmup.robust_finetune:
            return dataclasses.replace(self.finetune, mode="asam", sam_rho=self.warmup.robust_rho)
        return self.finetune

    def measures_sharpness(self) -> bool:
        return self.sharpness.when == "always" or (self.sharpness.when == "adasap" and self.adasap)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _section_to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def save(self, path: str | os.PathLike[str]) -> None:
        write_text_atomic(path, self.to_toml())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """Build from nested tables; unknown tables or keys and mistyped values are errors."""
        config = cls()
        known = {f.name for f in dataclasses.fields(cls)}
        for table, values in data.items():
            if table not in known:
                raise ConfigError(f"unknown config table [{table}]; known tables: {', '.join(sorted(known))}")
            if not isinstance(values, dict):
                raise ConfigError(f"[{table}] must be a table of keys")
            for key, value in values.items():
                config.set(f"{table}.{key}", value)
        return config

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "RunConfig":
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        return cls.from_dict(data)

    def set(self, dotted: str, value: Any) -> None:
        """Set `table.key` to `value`, converting TOML/CLI types to the field's type."""
        table, _, key = dotted.partition(".")
        section = getattr(self, table, None) if table in {f.name for f in dataclasses.fields(self)} else None
        if section is None:
            raise ConfigError(f"unknown config table [{table}]")
        fields = {f.name: f for f in dataclasses.fields(section)}
        if key not in fields:
            raise ConfigError(
                f"unknown key {key!r} in [{table}]; known keys: {', '.join(sorted(fields))}"
            )
        setattr(section, key, _coerce(dotted, getattr(section, key), str(fields[key].type), value))


def check_one_device(run_device: str, finetune_device: str) -> None:
    """Every stage of a run computes on `run.device`; `finetune.device` may only repeat it (or
    stay `auto`), so a setting that would be ignored is an error instead."""
    fine = finetune_device.strip().lower()
    if fine != "auto" and fine != run_device.strip().lower():
        raise ConfigError(
            f"finetune.device must be auto or the same as run.device (every stage runs on run.device), "
            f"got {finetune_device!r} with run.device {run_device!r}; set run.device instead"
        )


def _section_to_dict(section: Any) -> dict[str, Any]:
    """TOML-ready dict of a section: tuples become lists, None values are left out."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, list):
            value = [_plain(v) for v in value]
        out[f.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    """Attack specs are written in the text form `parse_attack` reads back."""
    return value.to_text() if isinstance(value, AttackSpec) else value


def _coerce(name: str, current: Any, annotation: str, value: Any) -> Any:
    """Convert `value` to the type of the field's current value (or another type its
    annotation admits, such as a number for `float | str`), or raise `ConfigError`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and "float" in [
        part.strip() for part in annotation.split("|")
    ]:
        return float(value)

    def fail() -> ConfigError:
        return ConfigError(f"{name} must be {type(current).__name__}, got {value!r}")

    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        raise fail()
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if isinstance(current, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise fail()
        return type(current)(value)
    if isinstance(current, str):
        if isinstance(value, str):
            return value
        raise fail()
    return value
