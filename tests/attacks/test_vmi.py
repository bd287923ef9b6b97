"""VMI-FGSM against docs/baselines.md section 3."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.attacks.support import assert_batch_invariant
from tests.tiny import batch, make, tiny
from tgr_bench.images import quantize


# ---- VMI --------------------------------------------------------------------------------------
def reference_vmi(model, x, y, seeds, attack) -> torch.Tensor:
    """docs/baselines.md section 3, one image and one neighbour at a time, same noise draws."""

    def grad(inp, label):
        inp = inp.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(inp), label, reduction="sum"), inp)
        return g

    out = []
    for b in range(len(x)):
        xb, yb, sb = x[b : b + 1], y[b : b + 1], seeds[b : b + 1]
        delta, g, v = torch.zeros_like(xb), torch.zeros_like(xb), torch.zeros_like(xb)
        for t in range(attack.steps):
            g_cur = grad(xb + delta, yb)
            tuned = g_cur + v
            g = attack.decay * g + tuned / tuned.abs().mean()
            noise = attack.neighbour_noise(xb, t, sb)[0]  # (N, C, H, W), the fixed draw
            v = sum(grad(xb + delta + noise[i : i + 1], yb) for i in range(len(noise)))
            v = v / len(noise) - g_cur
            delta = (delta + attack.alpha * g.sign()).clamp(-attack.eps, attack.eps)
            delta = (xb + delta).clamp(0, 1) - xb
        out.append(xb + delta)
    return torch.cat(out)


def test_vmi_equals_step_by_step_reference():
    model = tiny("vit")
    x, y = batch(2)
    seeds = [11, 12]
    attack = make("vmi", steps=3, n_samples=4, beta=1.5)
    adv = attack.perturb(model, x, y, seeds)
    ref = reference_vmi(model, x, y, seeds, attack)
    clean = (x * 255).round().to(torch.uint8)
    assert torch.equal(quantize(adv, clean, 16), quantize(ref, clean, 16))
    mi = make("mi", steps=3).perturb(model, x, y, seeds)
    assert not torch.equal(adv, mi)  # the variance term changes the result


def test_vmi_noise_is_uniform_in_the_neighbourhood_and_per_image():
    attack = make("vmi", n_samples=6, beta=1.5)
    x = torch.zeros(2, 3, 8, 8)
    both = attack.neighbour_noise(x, 2, [5, 9])
    assert both.shape == (2, 6, 3, 8, 8)
    assert both.abs().max() <= 1.5 * 16 / 255 and both.abs().max() > 1.3 * 16 / 255
    assert torch.equal(both[1:], attack.neighbour_noise(x[:1], 2, [9]))
    assert not torch.equal(both[0], both[1])
    assert not torch.equal(both, attack.neighbour_noise(x, 3, [5, 9]))


def test_vmi_batch_invariance():
    assert_batch_invariant(make("vmi", steps=2, n_samples=3), tiny("vit"))


@pytest.mark.parametrize("chunk,passes", [(None, 1), (8, 3)])
def test_vmi_neighbours_are_batched(chunk, passes):
    model = tiny("vit")
    sizes = []
    handle = model.register_forward_hook(lambda m, a, o: sizes.append(a[0].shape[0]))
    x, y = batch(2)
    make("vmi", steps=1, n_samples=20, chunk=chunk).perturb(model, x, y, [0, 1])
    handle.remove()
    assert sizes[0] == 2  # the gradient at x_t
    assert sizes[1:] == ([40] if chunk is None else [16, 16, 8])
    assert len(sizes) == 1 + passes
