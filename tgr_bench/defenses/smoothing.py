"""Randomized smoothing's PREDICT (Cohen et al., ICML 2019): a prediction rule, not a transform.

Counting abstentions. PREDICT returns ABSTAIN (-1) when the top two counts are too close to
call. For clean accuracy an abstention is not a correct answer (the authors' script scores
`prediction == label`). For the untargeted success rate, tgr-bench's `prediction != label`
then counts an abstention as fooled, as TransferAttack's smoothing evaluation does; for a
targeted attack it never hits the target. That is the recommended reading: the smoothed
classifier failed to give the right answer, and the clean and adversarial numbers stay
complementary. A stricter reading (only a wrong class fools it) can be computed from the
predictions, so the abstention rate should be reported next to every smoothing result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tgr_bench.attacks.draws import mix
from tgr_bench.defenses.base import Defense, check_images, in_range, need_keys, whole_in
from tgr_bench.defenses.noise import normals, signed, stream_seeds
from tgr_bench.errors import UserError

ABSTAIN = -1
BACKGROUND = -2  # the smoothed top class is a TF-slim background logit: wrong, but no abstention
SMOOTH_TAG = 0x524E  # keeps the smoothing noise apart from every other draw of an image


@dataclass(frozen=True)
class Smoothing(Defense):
    """The smoothed classifier g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I), evaluated by
    PREDICT: n noisy copies of each image are classified; with nA and nB the two largest class
    counts, g returns the top class when the exact two-sided binomial test of nA successes in
    nA + nB trials at p = 1/2 (scipy's binom_test in the released code) has p-value <= alpha,
    and abstains otherwise. The noise is added, unclipped, to the [0, 1] pixels the network
    sees (the released code normalizes inside the classifier, after the noise): a model with
    an `input_size` first gets the image resized to it (bilinear, as PixelModel would), so the
    noise is i.i.d. at the network's own resolution. PREDICT has no N0: that is CERTIFY's
    selection sample, which PREDICT folds into its single sample of n.

    ImageNet settings: sigma must be the noise the base classifier was trained with (the
    released ResNet-50s: 0.25, 0.50, 1.00); the defaults are the released PREDICT command's,
    sigma 0.50, n = 1000, alpha = 0.001, 400 noisy copies per forward pass (the paper's
    PREDICT table: sigma 0.25, n in 100 .. 100,000, alpha 0.001). The noise of copy j of an
    image comes from its key and j alone (noise.py), so `batch` changes the speed, never the
    result."""

    sigma: float = 0.5
    n: int = 1000
    alpha: float = 0.001
    batch: int = 400

    name: ClassVar[str] = "smoothing"
    randomized: ClassVar[bool] = True
    reference: ClassVar[str] = (
        "Randomized smoothing: Cohen et al., Certified Adversarial Robustness via Randomized "
        "Smoothing, ICML 2019 (ImageNet: sigma 0.25/0.50/1.00; PREDICT alpha 0.001, N 100 to "
        "100,000, the released command N 1000)"
    )

    def __post_init__(self) -> None:
        in_range("defense.smoothing.sigma", self.sigma, 1e-6, 10.0, "the noise level")
        whole_in("defense.smoothing.n", self.n, 1, 10_000_000, "the noisy copies per image")
        alpha = in_range("defense.smoothing.alpha", self.alpha, 0.0, 1.0, "the failure rate")
        if alpha in (0.0, 1.0):
            raise UserError(f"defense.smoothing.alpha={self.alpha}: choose it inside (0, 1).")
        whole_in("defense.smoothing.batch", self.batch, 1, 10_000_000, "the copies per forward")

    def params(self) -> dict[str, Any]:
        # batch is left out: it changes no prediction.
        return {
            "smoothing_sigma": float(self.sigma),
            "smoothing_n": self.n,
            "smoothing_alpha": float(self.alpha),
        }

    def predict(self, model: nn.Module, x: torch.Tensor, keys: Sequence[int]) -> torch.Tensor:
        """(B,) class indices on the host: ABSTAIN (-1) where PREDICT abstains, argmax -
        label_offset otherwise (BACKGROUND, -2, for a background logit)."""
        offset = int(getattr(model, "label_offset", 0))
        return decide(self.counts(model, x, keys), self.alpha, offset)

    def counts(self, model: nn.Module, x: torch.Tensor, keys: Sequence[int]) -> torch.Tensor:
        """(B, logits) int64 counts of the model's argmax over each image's n noisy copies, on
        x's device; the copies run `batch` at a time with no wait for the device in between."""
        check_images(x)
        drawn = need_keys(self.name, keys, len(x))
        counts: torch.Tensor | None = None
        with torch.inference_mode():
            x = model_pixels(model, x)
            # One upload per call; every copy's seed is then made on the device from its
            # image's, so no chunk waits for a copy from the host.
            base = [signed(mix(key, SMOOTH_TAG)) for key in drawn]
            base_on = torch.tensor(base, dtype=torch.int64).to(x.device, non_blocking=True)
            total = len(x) * self.n
            for start in range(0, total, self.batch):
                rows = torch.arange(start, min(start + self.batch, total), device=x.device)
                image = rows // self.n
                noisy = x.index_select(0, image) + self.sigma * self.noise(base_on, rows, x)
                logits = model(noisy)
                if counts is None:
                    counts = logits.new_zeros((len(x), logits.shape[1]), dtype=torch.long)
                pred = logits.argmax(dim=1)
                counts.index_put_((image, pred), torch.ones_like(pred), accumulate=True)
        assert counts is not None  # n >= 1 and B >= 1 make at least one forward
        return counts

    def noise(self, base: torch.Tensor, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(len(rows), C, H, W) normals; row r is copy r % n of image r // n, made from that
        image's base seed and the copy's index alone."""
        seeds = stream_seeds(base.index_select(0, rows // self.n), rows % self.n)
        return normals(seeds, x[0].numel()).view(len(rows), *x.shape[1:]).to(x.dtype)


def decide(counts: torch.Tensor, alpha: float, label_offset: int = 0) -> torch.Tensor:
    """PREDICT's answer from (B, classes) counts, as a (B,) host tensor: the top class less
    label_offset, or ABSTAIN where the binomial test of the top two counts has p > alpha (ties
    always abstain: p = 1). The one copy to the host of the whole batch happens here."""
    if counts.shape[1] < 2:
        counts = F.pad(counts, (0, 2 - counts.shape[1]))  # a one-logit model: the runner-up is 0
    top = counts.topk(2, dim=1)
    values, classes = top.values.cpu().tolist(), top.indices[:, 0].cpu().tolist()
    out = []
    for (first, second), cls in zip(values, classes, strict=True):
        if binomial_p_value(first, first + second) > alpha:
            out.append(ABSTAIN)
        else:
            out.append(cls - label_offset if cls >= label_offset else BACKGROUND)
    return torch.tensor(out, dtype=torch.long)


def binomial_p_value(k: int, n: int) -> float:
    """The exact two-sided binomial test of k successes in n trials at p = 1/2, as scipy's
    binom_test: the probability of every outcome no likelier than k, here 2 * P(X >= max(k,
    n - k)) capped at 1 (the distribution is symmetric), and 1 when k = n / 2. Computed in
    integers (exact binomial coefficients), rounded once to a float."""
    if not 0 <= k <= n:
        raise ValueError(f"binomial_p_value needs 0 <= k <= n; got k={k}, n={n}.")
    high = max(k, n - k)
    if n == 0 or 2 * high == n:
        return 1.0
    term, tail = 1, 1  # C(n, n), and the sum of C(n, i) for i = n .. high
    for i in range(n, high, -1):
        term = term * i // (n - i + 1)  # C(n, i - 1)
        tail += term
    return float(min(Fraction(2 * tail, 2**n), Fraction(1)))


def model_pixels(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x at the network's input size (PixelModel's own bilinear resize), so the noise is added
    where the released code added it: to the network's [0, 1] input, before normalization."""
    size = getattr(model, "input_size", None)
    if isinstance(size, int) and (x.shape[-2], x.shape[-1]) != (size, size):
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x
