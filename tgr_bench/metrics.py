"""The paper's metrics, defined once: counts from predictions, rates from counts.

Evaluation computes counts per (adversarial set, target); the report adds the counts of shards
and computes the rates again from the sums, so a merged cell equals the unsharded run exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

COUNTS = ("n", "n_fooled", "n_clean_correct", "n_fooled_on_correct")
RATES = ("asr", "clean_acc", "asr_on_correct")
DESCRIPTION = (
    "asr = % of all images the target misclassifies (clean mistakes count, as in the paper); "
    "clean_acc = % of clean images the target classifies correctly; asr_on_correct = % of the "
    "clean-correct images the attack flips."
)


def counts(labels: torch.Tensor, clean_pred: torch.Tensor, adv_pred: torch.Tensor) -> dict:
    """Integer counts for one target on one set (all tensors on the host, same length)."""
    correct = clean_pred == labels
    fooled = adv_pred != labels
    return {
        "n": len(labels),
        "n_fooled": int(fooled.sum()),
        "n_clean_correct": int(correct.sum()),
        "n_fooled_on_correct": int((fooled & correct).sum()),
    }


def rates(c: Mapping[str, int]) -> dict[str, float]:
    """Percentages from counts; NaN where the denominator is zero (never a fake 0 or 100)."""

    def pct(a: int, b: int) -> float:
        return 100.0 * a / b if b else math.nan

    return {
        "asr": pct(c["n_fooled"], c["n"]),
        "clean_acc": pct(c["n_clean_correct"], c["n"]),
        "asr_on_correct": pct(c["n_fooled_on_correct"], c["n_clean_correct"]),
    }
