"""Randomized smoothing's PREDICT: the exact binomial test, abstention, per-image noise that does
not depend on the batch or on how the noisy copies are chunked."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from tgr_bench.attacks.draws import mix
from tgr_bench.defenses import ABSTAIN, Smoothing, load_defense
from tgr_bench.defenses.noise import normals, signed, splitmix, stream_seeds
from tgr_bench.defenses.smoothing import BACKGROUND, SMOOTH_TAG, binomial_p_value, decide
from tgr_bench.errors import UserError


@pytest.mark.parametrize(
    ("k", "n", "p"),
    [
        (8, 10, Fraction(112, 1024)),  # 2 * (C(10,8) + C(10,9) + C(10,10)) / 2^10
        (7, 10, Fraction(352, 1024)),  # 2 * (120 + 45 + 10 + 1) / 1024
        (6, 10, Fraction(772, 1024)),  # 2 * (210 + 120 + 45 + 10 + 1) / 1024
        (10, 10, Fraction(2, 1024)),
        (20, 20, Fraction(2, 2**20)),
        (5, 10, Fraction(1)),  # a tie
        (1, 1, Fraction(1)),  # 2 * 1/2
        (2, 3, Fraction(1)),  # 2 * (3 + 1) / 8 capped at 1
        (0, 0, Fraction(1)),
    ],
)
def test_binomial_p_value_equals_hand_computed_exact_values(k, n, p):
    assert binomial_p_value(k, n) == float(p)
    assert binomial_p_value(n - k, n) == float(p)  # two-sided: symmetric


def test_binomial_p_value_at_large_n_matches_a_direct_sum():
    n, k = 1000, 540
    tail = sum(math.comb(n, i) for i in range(k, n + 1))
    assert binomial_p_value(k, n) == float(Fraction(2 * tail, 2**n))
    assert 0.01 < binomial_p_value(k, n) < 0.02
    with pytest.raises(ValueError):
        binomial_p_value(11, 10)


def test_decide_abstains_on_ties_and_close_calls():
    counts = torch.tensor(
        [
            [0, 0, 5, 0, 5],  # tied: p = 1
            [0, 20, 0, 0, 0],  # p = 2^-19
            [0, 0, 10, 0, 0],  # p = 2 / 1024 > 0.001: PREDICT abstains even when unanimous
            [0, 540, 460, 0, 0],  # p ~ 0.013
            [900, 100, 0, 0, 0],
        ]
    )
    assert decide(counts, 0.001).tolist() == [ABSTAIN, 1, ABSTAIN, ABSTAIN, 0]
    assert decide(counts, 0.05).tolist() == [ABSTAIN, 1, 2, 1, 0]
    # A TF-slim network: logit 0 is the background class, logit c + 1 is class c.
    assert decide(counts, 0.001, label_offset=1).tolist() == [
        ABSTAIN,
        0,
        ABSTAIN,
        ABSTAIN,
        BACKGROUND,
    ]


class Always(nn.Module):
    """Logits whose argmax is `cls` for every input; records what it was given."""

    def __init__(self, cls: int, classes: int = 10, label_offset: int = 0) -> None:
        super().__init__()
        self.cls, self.classes, self.label_offset = cls, classes, label_offset
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        logits = torch.zeros(len(x), self.classes)
        logits[:, self.cls] = 1.0
        return logits


class Alternating(nn.Module):
    """Class 1 for even rows of each forward pass, class 2 for odd rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), 4)
        rows = torch.arange(len(x))
        logits[rows, 1 + rows % 2] = 1.0
        return logits


class Linear(nn.Module):
    """A fixed random linear classifier of the pixels: its answers change with the noise."""

    def __init__(self, size: int = 8, classes: int = 5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.randn(classes, 3 * size * size, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T


def images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g) / 255


def test_a_model_that_always_says_7_is_smoothed_to_7():
    x = images(3)
    assert Smoothing(n=20, batch=7).predict(Always(7), x, [1, 2, 3]).tolist() == [7, 7, 7]
    # With n = 10 even a unanimous vote has p = 2/1024 > alpha: PREDICT abstains.
    assert Smoothing(n=10).predict(Always(7), x, [1, 2, 3]).tolist() == [ABSTAIN] * 3
    # A background logit at 0 shifts every class down by one.
    assert Smoothing(n=20).predict(Always(8, label_offset=1), x, [1, 2, 3]).tolist() == [7] * 3


def test_tied_counts_abstain():
    counts = Smoothing(n=10, batch=10).counts(Alternating(), images(2), [1, 2])
    assert counts.tolist() == [[0, 5, 5, 0], [0, 5, 5, 0]]
    assert Smoothing(n=10, batch=10, alpha=0.5).predict(
        Alternating(), images(2), [1, 2]
    ).tolist() == [
        ABSTAIN,
        ABSTAIN,
    ]


def test_noise_is_added_unclipped_to_the_pixels_at_the_models_input_size():
    model = Always(3)
    model.input_size = 16
    x = images(2, size=8)
    smoothing = Smoothing(sigma=0.25, n=4, batch=3)
    smoothing.counts(model, x, [5, 6])
    seen = torch.cat(model.seen)
    assert seen.shape == (8, 3, 16, 16)
    upsized = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear")
    clean = upsized.repeat_interleave(4, dim=0)
    base = torch.tensor([signed(mix(key, SMOOTH_TAG)) for key in (5, 6)]).repeat_interleave(4)
    seeds = stream_seeds(base, torch.arange(4).repeat(2))
    expected = 0.25 * normals(seeds, 3 * 16 * 16).view(8, 3, 16, 16)
    assert torch.allclose(seen - clean, expected, atol=1e-6)
    assert seen.min() < 0 and seen.max() > 1  # not clipped to [0, 1]


def test_noise_is_per_image_a_batch_of_three_equals_each_alone():
    x, keys, model = images(3), [11, 12, 13], Linear()
    smoothing = Smoothing(sigma=0.5, n=50, batch=20)
    together = smoothing.counts(model, x, keys)
    alone = torch.cat([smoothing.counts(model, x[i : i + 1], [keys[i]]) for i in range(3)])
    assert torch.equal(together, alone)
    assert (together > 0).sum(1).min() >= 2  # the noise changes the answers
    assert not torch.equal(
        smoothing.counts(model, x[:1], [11]), smoothing.counts(model, x[:1], [14])
    )


@pytest.mark.parametrize("batch", [1, 3, 7, 50, 150, 1000])
def test_any_batch_of_noisy_copies_gives_the_same_counts(batch):
    x, keys, model = images(3, seed=1), [21, 22, 23], Linear()
    reference = Smoothing(sigma=0.5, n=50, batch=11).counts(model, x, keys)
    counts = Smoothing(sigma=0.5, n=50, batch=batch).counts(model, x, keys)
    assert torch.equal(counts, reference)
    predictions = Smoothing(sigma=0.5, n=50, batch=batch, alpha=0.05).predict(model, x, keys)
    assert torch.equal(predictions, decide(reference, 0.05))


def splitmix_reference(seed: int, count: int) -> list[int]:
    out, state = [], seed % 2**64
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) % 2**64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        out.append(z ^ (z >> 31))
    return out


def test_noise_bits_are_splitmix64_and_the_normals_are_standard():
    seeds = [0, 1, 2**63 + 5, 2**64 - 1, 0x123456789ABCDEF]
    bits = splitmix(torch.tensor([signed(s) for s in seeds]), 6)
    assert [[v % 2**64 for v in row] for row in bits.tolist()] == [
        splitmix_reference(s, 6) for s in seeds
    ]
    for seed, j in [(0, 0), (2**63 + 5, 5), (0x123456789ABCDEF, 1000)]:
        drawn = stream_seeds(torch.tensor([signed(seed)]), torch.tensor([j]))
        assert int(drawn) % 2**64 == splitmix_reference(seed, j + 1)[-1]
    z = normals(torch.arange(200, dtype=torch.int64), 5001)
    assert z.shape == (200, 5001)
    assert abs(float(z.mean())) < 0.005 and abs(float(z.std()) - 1) < 0.005
    assert abs(float((z > 1.96).float().mean()) - 0.025) < 0.002
    first = normals(torch.tensor([7, 8]), 10)
    assert torch.equal(normals(torch.tensor([8]), 10)[0], first[1])  # rows independent
    assert torch.equal(normals(torch.tensor([7]), 4)[0], first[0, :4])  # prefix of the stream


def test_keys_are_required():
    with pytest.raises(ValueError, match="randomized"):
        Smoothing().predict(Always(1), images(1), None)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"sigma": 0}, r"sigma=0: choose the noise level"),
        ({"n": 0}, r"n=0: choose the noisy copies per image"),
        ({"alpha": 0.0}, r"alpha=0.0: choose it inside \(0, 1\)"),
        ({"alpha": 2}, r"alpha=2: choose the failure rate in \[0, 1\]"),
        ({"batch": 0}, r"batch=0: choose the copies per forward"),
    ],
)
def test_smoothing_refuses_bad_settings(settings, match):
    with pytest.raises(UserError, match=match):
        Smoothing(**settings)


def test_smoothing_defaults_and_params():
    smoothing = load_defense("smoothing")
    assert (smoothing.sigma, smoothing.n, smoothing.alpha, smoothing.batch) == (
        0.5,
        1000,
        0.001,
        400,
    )
    assert smoothing.params() == {
        "smoothing_sigma": 0.5,
        "smoothing_n": 1000,
        "smoothing_alpha": 0.001,
    }
    assert "ICML 2019" in smoothing.reference


@pytest.mark.parametrize(("k", "n", "tail"), [(20, 20, 2**-20), (8, 8, 2**-8), (9, 10, 11 / 1024)])
def test_binomial_upper_tail_is_exact(k, n, tail):
    from tgr_bench.defenses.smoothing import binomial_upper_tail

    assert binomial_upper_tail(k, n) == tail
    assert binomial_upper_tail(0, n) == 1.0


def test_certify_selects_on_n0_copies_and_certifies_on_n_fresh_ones():
    x = images(3)
    certify = Smoothing(rule="certify", n0=5, n=20, batch=7)
    assert certify.predict(Always(7), x, [1, 2, 3]).tolist() == [7, 7, 7]  # P(X>=20) = 2^-20
    # Eight unanimous estimation copies: the lower bound of P(cA) stays below 1/2 at alpha 1e-3.
    short = Smoothing(rule="certify", n0=5, n=8)
    assert short.predict(Always(7), x, [1, 2, 3]).tolist() == [ABSTAIN] * 3
    # Selection and estimation copies are disjoint: copies 0..4, then 5..24 of each image.
    model = Linear()
    both = certify.counts(model, x, [1, 2, 3], 25)
    apart = certify.counts(model, x, [1, 2, 3], 5) + certify.counts(model, x, [1, 2, 3], 20, 5)
    assert torch.equal(both, apart)
    assert certify.params()["smoothing_rule"] == "certify" and certify.params()["smoothing_n0"] == 5
    with pytest.raises(UserError, match="n0=5 has no effect with rule=predict"):
        Smoothing(n0=5)
    with pytest.raises(UserError, match="rule='cert'"):
        Smoothing(rule="cert")
