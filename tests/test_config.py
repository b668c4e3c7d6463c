"""Run configuration: defaults, TOML round trip, overrides and every kind of bad value."""

from pathlib import Path

import pytest

from engine.common.errors import ConfigError
from engine.config import RunConfig
from engine.robustness.attacks import parse_attack

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "example-run.toml"


def test_defaults_are_the_papers() -> None:
    config = RunConfig()
    config.validate()
    assert (config.prune.method, config.prune.rate, config.prune.groups) == ("sr-gkp", 0.4375, 8)
    assert (config.finetune.lr, config.finetune.momentum, config.finetune.weight_decay) == (0.01, 0.9, 5e-4)
    assert config.finetune.batch_size == 64
    assert [parse_attack(a).label for a in config.evaluate.attacks] == ["fgsm-0.01", "fgsm-0.1", "pgd-8/255"]
    assert config.run.stages == ["prune", "finetune", "evaluate"]


def test_toml_round_trip(tmp_path: Path) -> None:
    config = RunConfig()
    config.set("prune.beta", 2)
    config.set("prune.ticket_window", [10, 20])
    config.set("finetune.track_attacks", ["fgsm:eps=0.01"])
    config.save(tmp_path / "run.toml")
    again = RunConfig.load(tmp_path / "run.toml")
    assert again.to_dict() == config.to_dict()
    assert again.prune.beta == 2.0 and again.prune.ticket_window == (10, 20)


def test_example_config_lists_every_key_with_its_default() -> None:
    assert RunConfig.load(EXAMPLE).to_dict() == RunConfig().to_dict()
    text = EXAMPLE.read_text()
    for table, keys in RunConfig().to_dict().items():
        assert f"[{table}]" in text
        for key in keys:
            assert f"\n{key} = " in text or f"\n# {key} = " in text, f"{table}.{key} undocumented"


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("[prune]\nrat = 0.5\n", "unknown key 'rat' in [prune]"),
        ("[pruning]\nrate = 0.5\n", "unknown config table [pruning]"),
        ("[prune]\nrate = 'half'\n", "prune.rate must be float"),
        ("[prune]\ngroups = 2.5\n", "prune.groups must be int"),
        ("[finetune]\naugment = 1\n", "finetune.augment must be bool"),
        ("[run]\nstages = 'prune'\n", "run.stages must be list"),
        ("[prune\nrate = 0.5\n", "not valid TOML"),
        ("prune = 3\n", "[prune] must be a table"),
    ],
)
def test_bad_config_files(tmp_path: Path, text: str, phrase: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        RunConfig.load(path)
    assert phrase in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "phrase"),
    [
        ("prune.rate", 1.5, "rate"),
        ("prune.groups", 0, "groups"),
        ("prune.method", "magic", "method"),
        ("deploy.form", "sparse", "deploy.form"),
        ("run.stages", ["prune", "deploy"], "run.stages"),
        ("evaluate.eps_space", "pixels", "eps_space"),
        ("finetune.epochs", 0, "epochs"),
        ("data.val_fraction", 0.7, "val_fraction"),
        ("run.device", "cuda:x", "run.device must be auto, cpu, cuda or cuda:N"),
        ("finetune.device", "cuda:-1", "finetune.device must be auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_values_fail_validation(key: str, value: object, phrase: str) -> None:
    config = RunConfig()
    config.set(key, value)
    with pytest.raises(ConfigError, match=phrase):
        config.validate()


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.load(tmp_path / "nope.toml")


@pytest.mark.parametrize(("run_device", "finetune_device", "ok"), [
    ("auto", "auto", True), ("cpu", "auto", True), ("cpu", "cpu", True), ("cpu", " CPU", True),
    ("auto", "cpu", False), ("cpu", "auto ", True),
])
def test_finetune_device_repeats_run_device_or_is_an_error(run_device: str, finetune_device: str, ok: bool) -> None:
    config = RunConfig()
    config.set("run.device", run_device)
    config.set("finetune.device", finetune_device)
    if ok:
        config.validate()
    else:
        with pytest.raises(ConfigError, match="finetune.device must be auto or the same as run.device"):
            config.validate()
