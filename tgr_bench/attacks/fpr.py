"""FPR: Forward Propagation Refinement (CVPR 2025), docs/fpr.md.

MI-FGSM on a source whose *forward* pass is changed by forward hooks; the backward pass is
whatever autograd derives from the changed forward. Two changes, as the released code
(`RYC-98/FPR`, `transferattack/collection/vitb.py`, `deitb.py`, `pitt.py`, `caits.py`):

* attention-map diversification: in a few blocks per family, each head's map P (the output of
  `attn.attn_drop`) becomes softmax(P * M) over the keys, M ~ U(1 - r, 1 + r) of shape
  (N_q, N_q), drawn afresh at every forward;
* token-embedding momentum: the output of every block's `attn` and `mlp` becomes
  acc = mom_emb_decay * acc.detach() + scale * out (scale * out at an image's first forward).

Departures (docs/fpr.md section 4): M is drawn per image from the image's key (the released
code shares one M over the batch, from numpy's global generator), and acc belongs to one
image's row, starting fresh at each `perturb` call (the released dict is never reset). The
hooks change only the attack's own forwards: the probe runs on a throwaway state, and any other
forward of the source inside the context sees the unchanged network.
"""

from __future__ import annotations

import contextlib
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tgr_bench.attacks.architectures import Family, containers
from tgr_bench.attacks.base import MIFGSM, MISettings
from tgr_bench.attacks.draws import mix
from tgr_bench.attacks.hooks import set_fused_attn
from tgr_bench.errors import UserError
from tgr_bench.schema import AUTO, key, number


@dataclass(frozen=True)
class Preset:
    """One released file's settings: the diversified blocks and the three constants."""

    attn_blocks: tuple[str, ...]
    attn_map_change_range: float
    scale: float
    mom_emb_decay: float
    file: str  # where the released code sets them


PRESETS: dict[str, Preset] = {
    "vit": Preset(
        ("blocks.0", "blocks.1", "blocks.4", "blocks.9", "blocks.11"), 25.0, 0.8, 0.3, "vitb.py"
    ),
    "deit": Preset(
        ("blocks.0", "blocks.1", "blocks.5", "blocks.10", "blocks.11"), 30.0, 0.7, 0.2, "deitb.py"
    ),
    "pit": Preset(
        ("transformers.0.blocks.1", "transformers.1.blocks.4", "transformers.2.blocks.3"),
        25.0,
        0.7,
        0.2,
        "pitt.py",
    ),
    "cait": Preset(("blocks.2", "blocks.14", "blocks_token_only.1"), 30.0, 0.6, 0.2, "caits.py"),
}
# The presets each source family may use; the first is what `preset=auto` means.
FAMILY_PRESETS = {"vit": ("vit", "deit"), "pit": ("pit",), "cait": ("cait",)}
# The containers of a family's transformer blocks, in forward order.
FAMILY_BLOCKS = {
    "vit": ("blocks",),
    "pit": ("transformers.*.blocks",),
    "cait": ("blocks", "blocks_token_only"),
}
ALL = "all"
DRAW_TAG = 0xF9_12  # keeps FPR's draws apart from the other keyed draws of an image
_PATH = re.compile(r"^[A-Za-z_]\w*(\.\w+)*$")


# ---- the two forward changes -------------------------------------------------------------------
def multipliers(
    keys: Sequence[int],
    step: int,
    salt: int,
    shape: tuple[int, int, int],
    r: float,
    device: torch.device,
) -> torch.Tensor:
    """(B, heads, N_q, N_q) multipliers M ~ U(1 - r, 1 + r), row b from its own generator
    seeded by (keys[b], step, salt): an image's M never depends on the rest of its batch."""
    rows = []
    for k in keys:
        gen = torch.Generator(device).manual_seed(mix(k, DRAW_TAG, step, salt) % (1 << 62))
        rows.append(torch.rand(shape, generator=gen, device=device))
    return torch.stack(rows).mul_(2.0 * r).add_(1.0 - r)


def diversified_map(attn: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """softmax(P * M) over the keys, per image and head: P (B, heads, N_q, N_k), M (B, heads,
    N_q, N_q); N_q = 1 (CaiT's class attention) makes M one number per head that scales the row.
    The product, not its log, is softmaxed again, as the released `diverse_attn_map`."""
    return torch.softmax(attn * m, dim=-1).to(attn.dtype)


def embedding_momentum(
    acc: torch.Tensor | None, out: torch.Tensor, scale: float, mom_emb_decay: float
) -> torch.Tensor:
    """acc = mom_emb_decay * acc.detach() + scale * out; scale * out when acc is None. The
    gradient reaches only the current output (the released `cross_iter_emb_momentum`)."""
    scaled = out * scale
    if acc is None:
        return scaled
    return mom_emb_decay * acc.detach() + scaled


# ---- settings ----------------------------------------------------------------------------------
def _paths(name: str, value: Any, extra: str) -> str | tuple[str, ...]:
    """`extra` (auto or all), or a list of module paths without repeats (may be empty)."""
    if value == extra:
        return extra
    items = list(value) if isinstance(value, list | tuple) else None
    bad = items is None or any(not isinstance(p, str) or not _PATH.match(p) for p in items)
    if bad or len(set(items or ())) != len(items or ()):
        raise UserError(
            f"{name}={value!r}: choose {extra} or a list of block paths without repeats, as "
            f"the network names them, e.g. {name}=[blocks.0,blocks.1] "
            f"(PiT: transformers.0.blocks.1; CaiT: blocks_token_only.1)."
        )
    return tuple(items or ())


def _auto_number(low: float, high: float | None, low_open: bool = False) -> Callable:
    def read(name: str, value: Any) -> float | str:
        if value == AUTO:
            return AUTO
        v = number(name, value)
        if v != v or v < low or (low_open and v == low) or (high is not None and v > high):
            shown = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high else "")
            raise UserError(f"{name}={value!r}: choose auto (the preset's) or a number {shown}.")
        return v

    return read


@dataclass(frozen=True)
class FPRSettings(MISettings):
    """attack=fpr: attention-map diversification and token-embedding momentum in the source's
    forward pass, on top of the MI-FGSM loop. `auto` takes the preset's value."""

    name: str = key("fpr")
    preset: str = key(
        AUTO,
        options=(AUTO, *PRESETS),
        help="the released file's settings: auto = vit on ViT, pit on PiT, cait on CaiT; "
        "deit for DeiT (deitb.py)",
    )
    attn_blocks: str | tuple[str, ...] = key(
        AUTO,
        parse=lambda n, v: _paths(n, v, AUTO),
        help="blocks whose attention map is diversified, e.g. [blocks.0,blocks.1]; [] for none",
    )
    momentum_blocks: str | tuple[str, ...] = key(
        ALL,
        parse=lambda n, v: _paths(n, v, ALL),
        help="blocks whose attn and mlp outputs get the momentum: all (released) or a list",
    )
    attn_map_change_range: float | str = key(
        AUTO, parse=_auto_number(0.0, None), help="r of M ~ U(1-r, 1+r); 25 ViT/PiT, 30 DeiT/CaiT"
    )
    scale: float | str = key(
        AUTO, parse=_auto_number(0.0, None, low_open=True), help="s of acc = d*acc + s*out"
    )
    mom_emb_decay: float | str = key(
        AUTO, parse=_auto_number(0.0, 1.0), help="d of acc = d*acc + s*out"
    )

    def check(self, where: str) -> None:
        super().check(where)
        for copies in ("si", "admix"):
            if getattr(self, copies).enabled:
                raise UserError(
                    f"{where}.{copies} with attack=fpr: FPR's embedding momentum carries each "
                    f"forward row's state to the next step, and the copies of "
                    f"{where}.{copies} (split on out-of-memory) have no such fixed rows. Use "
                    f"{where}.di, {where}.ti or {where}.patchout with FPR."
                )


# ---- the attack --------------------------------------------------------------------------------
def block_paths(net: nn.Module, family: str) -> list[str]:
    """Every transformer block of `net`, in forward order, as module paths."""
    return [
        f"{where}.{i}"
        for path in FAMILY_BLOCKS[family]
        for where, container in containers(net, path)
        for i, _ in enumerate(container.children())
    ]


class FPR(MIFGSM):
    name = "fpr"
    reference = (
        "FPR: Ren et al., Improving Adversarial Transferability on Vision Transformers via "
        "Forward Propagation Refinement, CVPR 2025"
    )
    Settings = FPRSettings

    def __init__(self, settings: FPRSettings | None = None, family: Family | None = None) -> None:
        super().__init__(settings, family)
        s: FPRSettings = self.settings  # type: ignore[assignment]
        if family is None or family.name not in FAMILY_PRESETS:
            what = f"the {family.name} family" if family else "a source of no known family"
            raise UserError(
                f"FPR does not support {what}: the released code covers ViT and DeiT (family "
                f"vit), PiT (pit) and CaiT (cait). Choose a source of those families."
            )
        allowed = FAMILY_PRESETS[family.name]
        self.auto_preset = s.preset == AUTO
        self.preset = allowed[0] if self.auto_preset else s.preset
        if self.preset not in allowed:
            raise UserError(
                f"attack.preset={s.preset} is the released setting for another architecture; "
                f"a {family.name} source takes attack.preset={' or '.join(allowed)} (or auto)."
            )
        p = PRESETS[self.preset]
        self.attn_blocks: tuple[str, ...] = (
            p.attn_blocks if s.attn_blocks == AUTO else tuple(s.attn_blocks)
        )
        self.momentum_blocks = s.momentum_blocks
        if not self.attn_blocks and self.momentum_blocks == ():
            raise UserError(
                "attack.attn_blocks=[] and attack.momentum_blocks=[] leave FPR nothing to change: "
                "that is attack=mi."
            )
        chosen = {k: getattr(s, k) for k in ("attn_map_change_range", "scale", "mom_emb_decay")}
        value = {k: float(getattr(p, k) if v == AUTO else v) for k, v in chosen.items()}
        self.r, self.scale = value["attn_map_change_range"], value["scale"]
        self.mom_emb_decay = value["mom_emb_decay"]
        self.fired: Counter[str] = Counter()  # per kind over the whole run: attn_map, attn, mlp
        self._site_fired: Counter[str] = Counter()  # per site, since the last reset
        self._sites: list[str] = []
        self._inside = False  # within source_context, the hooks installed and proven
        # What the hooks act on: None (pass through), "probe" or "attack"; the rows' draw keys,
        # the step, and the momentum state of the current perturb call.
        self._mode: str | None = None
        self._keys: Sequence[int] = ()
        self._step = 0
        self._state: dict[str, torch.Tensor] = {}

    def params(self) -> dict[str, Any]:
        momentum = self.momentum_blocks
        shown = momentum if isinstance(momentum, str) else "+".join(momentum) or "none"
        return {
            **super().params(),
            "preset": self.preset,
            "attn_blocks": "+".join(self.attn_blocks) or "none",
            "momentum_blocks": shown,
            "attn_map_change_range": self.r,
            "scale": self.scale,
            "mom_emb_decay": self.mom_emb_decay,
        }

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "fpr_fired": dict(self.fired),
            "fpr_family": self.family.name if self.family else None,
        }

    # ---- binding -----------------------------------------------------------------------------
    def _check_network(self, net: nn.Module) -> None:
        assert self.family is not None
        names = {c.__name__ for c in type(net).__mro__}
        if not names & set(self.family.classes):
            raise UserError(
                f"The source network is a {type(net).__name__}, but FPR was built for the "
                f"{self.family.name} family (from the source's model name). Fix the timm_modules "
                f"entries of tgr_bench/attacks/architectures.py for this model name."
            )
        if self.auto_preset and "VisionTransformerDistilled" in names:
            p = PRESETS["deit"]
            raise UserError(
                f"FPR on a distilled DeiT: the released code has its own DeiT-B settings "
                f"(deitb.py: blocks {list(p.attn_blocks)}, r {p.attn_map_change_range:g}, "
                f"scale {p.scale:g}, decay {p.mom_emb_decay:g}). Set attack.preset=deit for "
                f"them, or attack.preset=vit for ViT-B's."
            )

    def _blocks(self, net: nn.Module) -> tuple[list[str], list[str]]:
        """(diversified blocks, momentum blocks) of `net`; a block it lacks is refused."""
        assert self.family is not None
        have = block_paths(net, self.family.name)
        preset = PRESETS[self.preset]
        momentum = have if self.momentum_blocks == ALL else list(self.momentum_blocks)
        for where, chosen in (("attn_blocks", self.attn_blocks), ("momentum_blocks", momentum)):
            missing = [b for b in chosen if b not in have]
            if missing:
                shown = ", ".join(have[:8]) + (", ..." if len(have) > 8 else "")
                released = where == "attn_blocks" and self.attn_blocks == preset.attn_blocks
                why = f" (the released {preset.file} list)" if released else ""
                raise UserError(
                    f"attack.{where} names {', '.join(missing)}{why}, which this "
                    f"{type(net).__name__} source does not have; its {len(have)} blocks are "
                    f"{shown}. Set attack.{where}=[...] to blocks of this source."
                )
        return list(self.attn_blocks), momentum

    def _hook(self, site: str, kind: str, edit: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor | None:
            if self._mode is None:  # a forward outside the attack's loop and the probe
                return None
            self.fired[kind] += 1
            self._site_fired[site] += 1
            return edit(out)

        return hook

    def _install(self, net: nn.Module) -> list[Any]:
        attn, momentum = self._blocks(net)
        sites: list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]] = []
        for block in attn:
            salt = zlib.crc32(block.encode())
            sites.append((f"{block}.attn.attn_drop", "attn_map", self._diversifier(salt)))
        for block in momentum:
            for part in ("attn", "mlp"):
                site = f"{block}.{part}"
                sites.append((site, part, self._accumulator(site)))
        self._sites = [site for site, _, _ in sites]
        handles = []
        for site, kind, edit in sites:
            module = net.get_submodule(site)
            handles.append(module.register_forward_hook(self._hook(site, kind, edit)))
        return handles

    # ---- the edits ---------------------------------------------------------------------------
    def _diversifier(self, salt: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def edit(attn: torch.Tensor) -> torch.Tensor:
            b, heads, rows, _ = attn.shape  # host metadata: no sync
            self._check_rows(b)
            m = multipliers(self._keys, self._step, salt, (heads, rows, rows), self.r, attn.device)
            return diversified_map(attn, m)

        return edit

    def _accumulator(self, site: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def edit(out: torch.Tensor) -> torch.Tensor:
            self._check_rows(len(out))
            acc = embedding_momentum(self._state.get(site), out, self.scale, self.mom_emb_decay)
            # Only the value carries to the next forward (the released code detaches it there).
            self._state[site] = acc.detach()
            return acc

        return edit

    def _check_rows(self, rows: int) -> None:
        if rows != len(self._keys):
            raise RuntimeError(
                f"FPR's hooks saw {rows} rows for {len(self._keys)} images: the source ran on "
                f"an input that is not the attack's batch."
            )

    # ---- the loop ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _active(self, mode: str, keys: Sequence[int]) -> Iterator[None]:
        """The hooks edit while inside, with a state that starts empty and is dropped on exit:
        nothing carries from one perturb call (one batch) or from the probe to another."""
        self._mode, self._keys, self._step, self._state = mode, list(keys), 0, {}
        self._site_fired.clear()
        try:
            yield
        finally:
            self._mode, self._keys, self._state = None, (), {}

    def input_gradient(
        self,
        model: nn.Module,
        x: torch.Tensor,
        delta: torch.Tensor,
        y: torch.Tensor,
        step: int,
        seeds: Sequence[int],
        keys: Sequence[int] | None = None,
        ids: Sequence[int] | None = None,
    ) -> torch.Tensor:
        # The rows' draw keys for this step's forward: the images' keys, as DI draws from them.
        self._keys, self._step = list(seeds if keys is None else keys), step
        return super().input_gradient(model, x, delta, y, step, seeds, keys, ids)

    def perturb(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        seeds: Sequence[int],
        ids: Sequence[int] | None = None,
    ) -> torch.Tensor:
        if not self._inside:
            raise RuntimeError("FPR.perturb runs inside attack.source_context(model).")
        with self._active("attack", seeds):
            adv = super().perturb(model, x, y, seeds, ids)
            # Host counters, no device sync: each site ran once per step on this batch.
            self._check_fired(self.steps, "attack")
        return adv

    def _check_fired(self, times: int, stage: str) -> None:
        wrong = {s: self._site_fired[s] for s in self._sites if self._site_fired[s] != times}
        if wrong:
            shown = ", ".join(f"{s}: {n}" for s, n in list(wrong.items())[:5])
            raise UserError(
                f"FPR's forward hooks ran other than {times} time(s) during the {stage} at "
                f"{len(wrong)} of {len(self._sites)} sites ({shown}): those modules would run "
                f"unchanged or be keyed wrongly. Did the timm version change how the blocks "
                f"call attn_drop, attn and mlp, or is fused attention still on?"
            )

    def _probe(self, model: nn.Module) -> None:
        """One forward on a throwaway state proves that every site fires once per forward."""
        size = getattr(model, "input_size", 224)
        device = next(iter(model.buffers()), torch.empty(0)).device
        ramp = torch.linspace(0.4, 0.6, 3 * size * size, device=device)  # any non-constant image
        with self._active("probe", [0]), torch.no_grad():
            model(ramp.view(1, 3, size, size))
            self._check_fired(1, "probe")
        self.fired.clear()

    @contextlib.contextmanager
    def source_context(self, model: nn.Module) -> Iterator[None]:
        net = getattr(model, "net", model)
        self._check_network(net)
        previous = set_fused_attn(net, False)
        handles: list[Any] = []
        try:
            handles = self._install(net)
            self._probe(model)
            self._inside = True
            yield
        finally:
            self._inside = False
            for h in handles:
                h.remove()
            for m, flag in previous:
                m.fused_attn = flag
            self._sites = []
