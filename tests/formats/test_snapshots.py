"""Training snapshots: per-epoch directories (names, wrappers, gaps, mismatches) and the compact
int8-delta archive (SPEC §3.2, §6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.common.errors import ConfigError, SnapshotError
from engine.formats.listing import epoch_of, snapshot_epochs
from engine.formats.snapshots import load_snapshots, open_snapshots, save_snapshot_archive
from engine.models.architectures import ArchSpec, build_model


def tiny_state(seed: int, channels: int = 4) -> dict[str, torch.Tensor]:
    """A small conv + BN state dict, distinct per seed."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(channels, 3, 3, 3, generator=gen),
        "bn.weight": torch.randn(channels, generator=gen),
        "bn.running_mean": torch.randn(channels, generator=gen),
        "fc.weight": torch.randn(2, channels, generator=gen),
    }


def write_epochs(directory: Path, epochs, name: str = "epoch_{}.pt") -> dict[int, dict[str, torch.Tensor]]:
    directory.mkdir(parents=True, exist_ok=True)
    states = {}
    for epoch in epochs:
        states[epoch] = tiny_state(epoch)
        torch.save(states[epoch], directory / name.format(epoch))
    return states


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("name", "epoch"),
    [("epoch_5.pt", 5), ("epoch5.pth", 5), ("checkpoint_12.pth.tar", 12), ("12.pt", 12),
     ("resnet20_epoch_7.pt", 7), ("ep-3.ckpt", 3), ("resnet20_5_3.pt", None), ("notes_1.txt", None),
     ("final.pt", None)],
)
def test_epoch_of_file_names(name: str, epoch: int | None) -> None:
    assert epoch_of(name) == epoch


def test_names_wrappers_and_prefixes(tmp_path: Path) -> None:
    states = {e: tiny_state(e) for e in (1, 2, 3, 4)}
    torch.save(states[1], tmp_path / "epoch_1.pt")
    torch.save({"model_state_dict": states[2], "epoch": 2, "loss": 0.3}, tmp_path / "epoch2.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in states[3].items()}}, tmp_path / "checkpoint_3.pt")
    torch.save({f"module.{k}": v for k, v in states[4].items()}, tmp_path / "4.pt")
    (tmp_path / "train.log").write_text("epoch 5\n")
    loaded = load_snapshots(tmp_path, reference=states[1])
    assert sorted(loaded) == [1, 2, 3, 4]
    for epoch, state in states.items():
        assert_states_equal(loaded[epoch], state)


def test_open_snapshots_reads_each_file_when_asked(tmp_path: Path) -> None:
    states = write_epochs(tmp_path, [1, 2])
    (tmp_path / "epoch_3.pt").write_bytes(b"")
    source = open_snapshots(tmp_path)  # names only: the empty file is not read yet
    assert list(source) == [1, 2, 3] and len(source) == 3 and 2 in source and 4 not in source
    assert_states_equal(source[2], states[2])
    with pytest.raises(KeyError):
        source[4]
    with pytest.raises(SnapshotError, match="epoch_3.pt is empty"):
        source.check()


def test_gap_inside_window_names_found_epochs(tmp_path: Path) -> None:
    write_epochs(tmp_path, [e for e in range(35, 71) if e not in (41, 42)])
    with pytest.raises(SnapshotError) as info:
        load_snapshots(tmp_path, window=(35, 70))
    assert str(info.value) == "missing epochs 41, 42 in ticket window 35..70 (found 35..40, 43..70)"
    assert sorted(load_snapshots(tmp_path, window=(43, 50))) == list(range(43, 51))


def test_window_and_step(tmp_path: Path) -> None:
    write_epochs(tmp_path, [0, 2, 4, 6, 8, 9])
    assert sorted(load_snapshots(tmp_path, window=(2, 8), step=2)) == [2, 4, 6, 8]
    with pytest.raises(SnapshotError, match=r"missing epochs 1, 3, 5, 7 in epochs 0\.\.9 \(found 0, 2, 4, 6, 8\.\.9\)"):
        load_snapshots(tmp_path)
    with pytest.raises(SnapshotError, match=r"missing epochs 10, 12 in ticket window 6\.\.12 at step 2"):
        load_snapshots(tmp_path, window=(6, 12), step=2)
    with pytest.raises(ConfigError, match="ticket step must be a positive integer"):
        load_snapshots(tmp_path, step=0)
    with pytest.raises(ConfigError, match="first <= last"):
        load_snapshots(tmp_path, window=(9, 2))


def test_long_gap_lists_are_capped(tmp_path: Path) -> None:
    write_epochs(tmp_path, [0, 1])
    with pytest.raises(SnapshotError, match=r"missing epochs 35, 36, 37, 38, 39, 40, 41, 42, \.\.\. \(36 in all\)"):
        load_snapshots(tmp_path, window=(35, 70))


def test_mixed_architectures(tmp_path: Path) -> None:
    write_epochs(tmp_path, [1, 2])
    torch.save(tiny_state(3, channels=8), tmp_path / "epoch_3.pt")
    with pytest.raises(SnapshotError, match=r"snapshots mix architectures: epoch_3\.pt differs from epoch_1\.pt: "
                                            r"key 'conv\.weight' expects shape \(4, 3, 3, 3\) but has \(8, 3, 3, 3\)"):
        load_snapshots(tmp_path)


def test_reference_mismatch_names_file_and_key(tmp_path: Path) -> None:
    write_epochs(tmp_path, [1, 2])
    reference = {**tiny_state(0), "extra.weight": torch.zeros(1)}
    with pytest.raises(SnapshotError, match=r"snapshot epoch_1\.pt does not match the model: key 'extra\.weight' is missing"):
        load_snapshots(tmp_path, reference=reference)


def test_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="does not exist"):
        load_snapshots(tmp_path / "nope")
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(SnapshotError, match="no snapshot files in .*named like epoch_12.pt, epoch12.pth"):
        load_snapshots(tmp_path)
    write_epochs(tmp_path, [5])
    torch.save(tiny_state(5), tmp_path / "5.pt")
    with pytest.raises(SnapshotError, match="epoch 5 has two snapshot files in .*: 5.pt and epoch_5.pt"):
        load_snapshots(tmp_path)


def test_unreadable_snapshot_names_file(tmp_path: Path) -> None:
    write_epochs(tmp_path, [1])
    (tmp_path / "epoch_2.pt").write_bytes(b"")
    with pytest.raises(SnapshotError, match="epoch_2.pt is empty"):
        load_snapshots(tmp_path)


# --- compact archive ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def training_run() -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """A ResNet-20's final weights and 6 synthetic snapshots drifting towards them."""
    spec = ArchSpec("cifar_resnet", "resnet20", {
        "depth": 20, "naming": "layer", "shortcut": "A", "width": 16, "num_classes": 10, "in_channels": 3,
    })
    torch.manual_seed(4)
    final = build_model(spec).state_dict()
    snapshots = {
        epoch: {k: v + (0.02 * (70 - epoch)) * torch.randn_like(v) if v.is_floating_point() else v.clone()
                for k, v in final.items()}
        for epoch in range(65, 71)
    }
    return final, snapshots


def test_archive_round_trip_error_within_half_a_step(tmp_path: Path, training_run) -> None:
    final, snapshots = training_run
    path = tmp_path / "snapshots.npz"
    save_snapshot_archive(path, snapshots, final)
    with np.load(path, allow_pickle=False) as data:
        scales = data["scales"]
        names = [str(n) for n in data["names"]]
        assert data["q0"].dtype == np.int8
    conv_keys = [k for k, v in final.items() if v.dim() == 4]
    assert names == conv_keys
    loaded = load_snapshots(path, reference=final)
    assert sorted(loaded) == list(range(65, 71))
    worst_ratio = worst_error = 0.0
    for j, epoch in enumerate(sorted(loaded)):
        assert list(loaded[epoch]) == conv_keys
        for i, key in enumerate(conv_keys):
            assert loaded[epoch][key].dtype == torch.float32
            error = float((loaded[epoch][key].double() - snapshots[epoch][key].double()).abs().max())
            # the step the format promises (max|delta|/127), computed here, not read from the archive
            scale = float((snapshots[epoch][key].double() - final[key].double()).abs().max()) / 127
            assert float(scales[j, i]) == pytest.approx(scale, rel=1e-6)
            # half a quantisation step, plus float32 rounding of the dequantised value
            assert error <= scale / 2 + 1e-6, (epoch, key, error, scale)
            worst_error = max(worst_error, error)
            if scale:
                worst_ratio = max(worst_ratio, error / scale)
    print(f"max |reconstruction error| = {worst_error:.3g}, max error / scale = {worst_ratio:.4f}")
    assert all(torch.equal(loaded[70][k], final[k]) for k in conv_keys)  # epoch 70 == final: zero deltas


def test_archive_window_and_errors(tmp_path: Path, training_run) -> None:
    final, snapshots = training_run
    path = tmp_path / "snapshots.npz"
    save_snapshot_archive(path, snapshots, final)
    assert sorted(load_snapshots(path, reference=final, window=(66, 70), step=2)) == [66, 68, 70]
    with pytest.raises(SnapshotError, match=r"missing epochs 60, 61, 62, 63, 64 in ticket window 60\.\.70 \(found 65\.\.70\)"):
        load_snapshots(path, reference=final, window=(60, 70))
    with pytest.raises(SnapshotError, match="compact snapshot archive .*pass the final state dict as reference"):
        load_snapshots(path)
    other = {k: v + 1.0 if v.dim() == 4 else v for k, v in final.items()}
    with pytest.raises(SnapshotError, match="made from different final weights than the reference"):
        load_snapshots(path, reference=other)
    with pytest.raises(SnapshotError, match="does not match the model: key 'conv1.weight'"):
        load_snapshots(path, reference={k: v for k, v in final.items() if k != "conv1.weight"})
    broken = tmp_path / "broken.npz"
    broken.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(SnapshotError, match="neither a snapshot directory nor a readable snapshot archive"):
        load_snapshots(broken, reference=final)
    with pytest.raises(SnapshotError, match="has no conv weight 'conv1.weight'"):
        save_snapshot_archive(tmp_path / "bad.npz", {1: {}}, final)


class _TouchOnUnpickle:
    """Unpickling this object creates `marker`: a payload that would run if an archive's object
    arrays were ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("key", ["format", "epochs", "q0"])
def test_archive_with_pickled_objects_is_refused_without_running_them(tmp_path: Path, training_run, key: str) -> None:
    final, snapshots = training_run
    good = tmp_path / "snapshots.npz"
    save_snapshot_archive(good, snapshots, final)
    with np.load(good, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    marker = tmp_path / "ran"
    arrays[key] = np.array([_TouchOnUnpickle(marker)], dtype=object)
    tampered = tmp_path / "tampered.npz"
    np.savez(tampered, **arrays)
    with pytest.raises(SnapshotError, match=f"array {key}.npy holds pickled Python objects, which are never loaded"):
        load_snapshots(tampered, reference=final)
    with pytest.raises(SnapshotError):
        snapshot_epochs(tampered, None, 1)
    assert not marker.exists()
    with np.load(tampered, allow_pickle=True) as data:
        data[key]  # the payload is live: a loader that unpickled would have run it
    assert marker.exists()
