"""The paper's metrics, defined once: counts from predictions, rates from counts.

Evaluation computes counts per (adversarial set, target); the report adds the counts of shards
and computes the rates again from the sums, so a merged cell equals the unsharded run exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

COUNTS = ("n", "n_fooled", "n_clean_correct", "n_fooled_on_correct", "n_target_hit")
RATES = ("asr", "clean_acc", "asr_on_correct", "tsr")
DESCRIPTION = (
    "asr = % of all images the target misclassifies (clean mistakes count, as in the paper); "
    "clean_acc = % of clean images the target classifies correctly; asr_on_correct = % of the "
    "clean-correct images the attack flips; tsr (targeted attacks) = % of all images the target "
    "classifies as the attack's target label."
)


def counts(
    labels: torch.Tensor,
    clean_pred: torch.Tensor,
    adv_pred: torch.Tensor,
    aims: torch.Tensor | None = None,
) -> dict:
    """Integer counts for one target on one set (all tensors on the host, same length); a
    targeted set also counts the images classified as their target label (else None)."""
    correct = clean_pred == labels
    fooled = adv_pred != labels
    return {
        "n": len(labels),
        "n_fooled": int(fooled.sum()),
        "n_clean_correct": int(correct.sum()),
        "n_fooled_on_correct": int((fooled & correct).sum()),
        "n_target_hit": None if aims is None else int((adv_pred == aims).sum()),
    }


def rates(c: Mapping[str, int]) -> dict[str, float]:
    """Percentages from counts; NaN where the denominator is zero (never a fake 0 or 100)."""

    def pct(a: int, b: int) -> float:
        return 100.0 * a / b if b else math.nan

    hit = c.get("n_target_hit")
    return {
        "asr": pct(c["n_fooled"], c["n"]),
        "clean_acc": pct(c["n_clean_correct"], c["n"]),
        "asr_on_correct": pct(c["n_fooled_on_correct"], c["n_clean_correct"]),
        "tsr": math.nan if hit is None else pct(hit, c["n"]),
    }
