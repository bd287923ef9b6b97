"""Helpers of the attack tests: PNGs of an attack and the batch-invariance check."""

from __future__ import annotations

import torch

from tests.tiny import batch
from tgr_bench.attacks import MIFGSM
from tgr_bench.attacks.architectures import INPUT, OUTPUT, SOFTMAX_INPUT
from tgr_bench.images import quantize
from tgr_bench.pixels import TensorPixels


def pngs(attack: MIFGSM, model, x, y, seeds, ids=None) -> torch.Tensor:
    with attack.source_context(model):
        adv = attack.perturb(model, x, y, seeds, ids)
    return quantize(adv, (x * 255).round().to(torch.uint8), attack.eps_levels)


def pool_of(n: int) -> TensorPixels:
    """The clean images of a small data set, as Admix's partner pool (the batch is its start)."""
    x, _ = batch(n)
    return TensorPixels((x * 255).round().to(torch.uint8))


def assert_batch_invariant(attack: MIFGSM, model, n: int = 3) -> None:
    x, y = batch(n)
    seeds = list(range(100, 100 + n))
    ids = list(range(n))
    if attack.admix is not None:
        attack.use_pool(pool_of(n + 3))
    together = pngs(attack, model, x, y, seeds, ids)
    alone = torch.cat(
        [
            pngs(attack, model, x[i : i + 1], y[i : i + 1], seeds[i : i + 1], ids[i : i + 1])
            for i in range(n)
        ]
    )
    assert torch.equal(together, alone)


def capture(bound, log: dict):
    """Hooks that record the gradient arriving at Z and the gradient that leaves Z for its
    producer. Register them after the attack's (inside its context): for outputs, the tensor
    hook sees the arriving gradient and the node pre-hook runs after the attack's edit."""
    site, key = bound.site, bound.name

    def arrive(g):
        log.setdefault(key, {})["arrive"] = g.detach().clone()

    def reach(grad_outputs):
        log.setdefault(key, {})["reach"] = grad_outputs[0].detach().clone()

    if site.where == OUTPUT:

        def hook(module, args, out):
            out.register_hook(arrive)
            out.grad_fn.register_prehook(reach)

        return bound.module.register_forward_hook(hook)
    if site.where == SOFTMAX_INPUT:

        def hook(module, args, p):
            def at_p(gp):  # softmax backward from first principles: dS = P * (dP - <dP, P>)
                arrive(p.detach() * (gp - (gp * p.detach()).sum(-1, keepdim=True)))

            p.register_hook(at_p)
            p.grad_fn.next_functions[0][0].register_prehook(reach)

        return bound.module.register_forward_hook(hook, prepend=True)
    assert site.where == INPUT

    def pre(module, args):
        args[0].grad_fn.register_prehook(reach)

    def post(module, args, out):
        out.grad_fn.register_hook(lambda gin, gout: arrive(gin[0]))

    return [
        bound.module.register_forward_pre_hook(pre, prepend=True),
        bound.module.register_forward_hook(post, prepend=True),
    ]
