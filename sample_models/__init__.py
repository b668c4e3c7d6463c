"""The bundled sample: a CIFAR-style ResNet-20 trained on scikit-learn's digits by
`train_sample.py` in this folder, with its compact training snapshots for TMI-GKP."""

from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLE_CHECKPOINT = HERE / "resnet20_digits.pt"
SAMPLE_SNAPSHOTS = HERE / "resnet20_digits_snapshots.npz"
