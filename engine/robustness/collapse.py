"""Collapse warnings: a model that predicts one class for nearly every input, never predicts some
classes, scores within a few points of guessing or has lost most of the accuracy of the model it
came from makes every robustness figure measured on it meaningless (an attack cannot lower 10%
much). Said in words wherever such a number is shown."""

from __future__ import annotations

from collections.abc import Sequence

# Accuracy at most this far above chance (1 / classes) counts as guessing.
CHANCE_MARGIN = 0.05
# A model predicting one class for at least this share of the inputs has collapsed.
ONE_CLASS_SHARE = 0.90
# Classes never predicted count only from this many images per class up (a healthy model
# predicts every class some of the time; on a handful of images it need not).
IMAGES_PER_CLASS_FOR_ABSENT = 20
# Accuracy below this share of the reference model's (on the same images) counts as collapsed.
REFERENCE_SHARE = 0.5
ADVICE = "fine-tune or recalibrate before reading robustness figures"


def collapse_warnings(
    what: str,
    accuracy: float,
    predicted: Sequence[int],
    classes: Sequence[str] = (),
    *,
    reference: tuple[str, float] | None = None,
) -> list[str]:
    """One warning (or none when healthy) about `what` (e.g. "pruned model before
    recalibration"), from its accuracy and how many inputs it assigned to each class; `classes`
    names them (indices stand in where it does not); `reference` is (label, accuracy) of the
    model it came from, measured on the same images."""
    n = sum(predicted)
    if n == 0:
        return []
    n_classes = max(len(predicted), len(classes))

    def name(k: int) -> str:
        return f"'{classes[k] if k < len(classes) else k}'"

    top = max(range(len(predicted)), key=lambda k: predicted[k])
    share = predicted[top] / n
    chance = 1.0 / n_classes
    parts = []
    if share >= ONE_CLASS_SHARE:
        parts.append(f"predicts {name(top)} for {share:.0%} of {n} images")
    if n_classes > 1 and accuracy <= chance + CHANCE_MARGIN:
        parts.append(
            f"accuracy {accuracy:.1%} is within {100 * CHANCE_MARGIN:.0f} points of chance "
            f"({chance:.1%} for {n_classes} classes)"
        )
    elif reference is not None and accuracy < REFERENCE_SHARE * reference[1]:
        parts.append(f"accuracy {accuracy:.1%} is under half of the {reference[0]}'s {reference[1]:.1%}")
    absent = [k for k in range(n_classes) if k >= len(predicted) or predicted[k] == 0]
    if share < ONE_CLASS_SHARE and absent and n >= IMAGES_PER_CLASS_FOR_ABSENT * n_classes:
        parts.append(f"never predicts {', '.join(name(k) for k in absent)} in {n} images")
    return [f"{what}: {'; '.join(parts)} — {ADVICE}"] if parts else []
