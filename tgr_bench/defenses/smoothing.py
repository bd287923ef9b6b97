"""Randomized smoothing (Cohen et al., ICML 2019) as a prediction rule, not a transform: PREDICT
(the default) or CERTIFY's certified prediction (`rule=certify`, with its selection sample n0).

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

RULES = ("predict", "certify")
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

    `rule=certify` gives CERTIFY's certified prediction instead: the top class cA of n0 noisy
    copies (selection), then n fresh copies (estimation) whose count nA of cA must make the
    one-sided Clopper-Pearson lower bound of P(cA) at level alpha exceed 1/2, else it abstains.
    That bound exceeds 1/2 exactly when P(X >= nA) <= alpha for X ~ Binomial(n, 1/2), so the
    exact binomial tail decides it (the radius sigma * Phi^-1(bound) is not reported). The
    paper's CERTIFY settings: n0 = 100, n = 100,000, alpha = 0.001.

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
    rule: str = "predict"
    n0: int = 100  # CERTIFY's selection copies (rule=certify)

    name: ClassVar[str] = "smoothing"
    randomized: ClassVar[bool] = True
    unlabelled: ClassVar[tuple[str, ...]] = ("batch",)  # copies per pass: no prediction changes
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
        if self.rule not in RULES:
            raise UserError(f"defense.smoothing.rule={self.rule!r}: choose one of {list(RULES)}.")
        whole_in("defense.smoothing.n0", self.n0, 1, 10_000_000, "CERTIFY's selection copies")
        if self.rule == "predict" and self.n0 != 100:
            raise UserError(
                f"defense.smoothing.n0={self.n0} has no effect with rule=predict (PREDICT has "
                f"no selection sample): set defense.smoothing.rule=certify, or leave n0 at 100."
            )

    def params(self) -> dict[str, Any]:
        # batch is left out: it changes no prediction.
        return {
            "smoothing_sigma": float(self.sigma),
            "smoothing_n": self.n,
            "smoothing_alpha": float(self.alpha),
            **({"smoothing_rule": "certify", "smoothing_n0": self.n0} if self.certify else {}),
        }

    @property
    def certify(self) -> bool:
        return self.rule == "certify"

    def predict(self, model: nn.Module, x: torch.Tensor, keys: Sequence[int]) -> torch.Tensor:
        """(B,) class indices on the host: ABSTAIN (-1) where PREDICT abstains, argmax -
        label_offset otherwise (BACKGROUND, -2, for a background logit)."""
        offset = int(getattr(model, "label_offset", 0))
        if not self.certify:
            return decide(self.counts(model, x, keys), self.alpha, offset)
        # Selection and estimation use disjoint copies: n0 first, then n more of each image.
        chosen = self.counts(model, x, keys, self.n0).argmax(dim=1)
        estimated = self.counts(model, x, keys, self.n, first=self.n0)
        return certified(chosen, estimated, self.n, self.alpha, offset)

    def counts(
        self,
        model: nn.Module,
        x: torch.Tensor,
        keys: Sequence[int],
        copies: int | None = None,
        first: int = 0,
    ) -> torch.Tensor:
        """(B, logits) int64 counts of the model's argmax over each image's noisy copies first ..
        first + copies - 1 (default: n), on x's device; the copies run `batch` at a time with no
        wait for the device in between."""
        copies = self.n if copies is None else copies
        check_images(x)
        drawn = need_keys(self.name, keys, len(x))
        counts: torch.Tensor | None = None
        with torch.inference_mode():
            x = model_pixels(model, x)
            # One upload per call; every copy's seed is then made on the device from its
            # image's, so no chunk waits for a copy from the host.
            base = [signed(mix(key, SMOOTH_TAG)) for key in drawn]
            base_on = torch.tensor(base, dtype=torch.int64).to(x.device, non_blocking=True)
            total = len(x) * copies
            for start in range(0, total, self.batch):
                rows = torch.arange(start, min(start + self.batch, total), device=x.device)
                image = rows // copies
                copy = first + rows % copies
                noisy = x.index_select(0, image) + self.sigma * self.noise(base_on, image, copy, x)
                logits = model(noisy)
                if counts is None:
                    counts = logits.new_zeros((len(x), logits.shape[1]), dtype=torch.long)
                pred = logits.argmax(dim=1)
                counts.index_put_((image, pred), torch.ones_like(pred), accumulate=True)
        assert counts is not None  # n >= 1 and B >= 1 make at least one forward
        return counts

    def noise(
        self, base: torch.Tensor, image: torch.Tensor, copy: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        """(len(image), C, H, W) normals; row r is copy copy[r] of image image[r], made from
        that image's base seed and the copy's index alone."""
        seeds = stream_seeds(base.index_select(0, image), copy)
        return normals(seeds, x[0].numel()).view(len(image), *x.shape[1:]).to(x.dtype)


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


def certified(
    chosen: torch.Tensor, counts: torch.Tensor, n: int, alpha: float, label_offset: int = 0
) -> torch.Tensor:
    """CERTIFY's answer as a (B,) host tensor: the selected class less label_offset where the
    estimation count nA of it has P(X >= nA) <= alpha under Binomial(n, 1/2) (the lower
    confidence bound of its probability above 1/2), else ABSTAIN."""
    n_a = counts.gather(1, chosen.view(-1, 1)).squeeze(1).cpu().tolist()
    out = []
    for cls, k in zip(chosen.cpu().tolist(), n_a, strict=True):
        if binomial_upper_tail(k, n) > alpha:
            out.append(ABSTAIN)
        else:
            out.append(cls - label_offset if cls >= label_offset else BACKGROUND)
    return torch.tensor(out, dtype=torch.long)


def binomial_upper_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exactly (integer binomial coefficients)."""
    if not 0 <= k <= n:
        raise ValueError(f"binomial_upper_tail needs 0 <= k <= n; got k={k}, n={n}.")
    term, tail = 1, 1  # C(n, n), and the sum of C(n, i) for i = n .. k
    for i in range(n, k, -1):
        term = term * i // (n - i + 1)  # C(n, i - 1)
        tail += term
    return float(Fraction(tail, 2**n))


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
