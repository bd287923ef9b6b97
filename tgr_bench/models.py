"""timm models that take [0,1] pixels, with the exact weights a config names.

Weights come from one of three places, resolved *before* any model is built so that a missing
file stops the run in seconds: a local checkpoint (`checkpoint=`), the Hugging Face cache (filled
on first use when the hub is reachable), or nowhere (`pretrained: false`, random weights, for the
tiny test models).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from tgr_bench.errors import UserError

log = logging.getLogger(__name__)

# timm writes its hub weights under one of these names; the first found wins, as in timm.
_HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")


class MissingCheckpoint(UserError):
    """A model whose weights timm does not ship was listed without `checkpoint=`."""


@dataclass(frozen=True)
class ModelSpec:
    """One model entry of a `source/` or `targets/` config."""

    key: str
    model: str  # timm name with weight tag, e.g. vit_base_patch16_224.augreg_in21k_ft_in1k
    pretrained: bool = True
    checkpoint: str | None = None
    requires_checkpoint: bool = False  # weights timm does not ship (Res-v2-101, Inc-v3-ens*)
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, ...] | None = None  # None: from the tag's pretrained config
    std: tuple[float, ...] | None = None
    input_size: int | None = None

    @classmethod
    def from_cfg(cls, cfg: Any) -> ModelSpec:
        d = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise UserError(
                f"Model entry {d.get('key', '?')!r} has unknown fields {sorted(unknown)}; "
                f"valid fields are {sorted(cls.__dataclass_fields__)}."
            )
        for name in ("mean", "std"):
            if d.get(name) is not None:
                d[name] = tuple(float(v) for v in d[name])
        d["kwargs"] = dict(d.get("kwargs") or {})
        if d.get("checkpoint") in ("", None):
            d["checkpoint"] = None
        else:
            d["checkpoint"] = str(d["checkpoint"])
        return cls(**d)

    def identity(self) -> dict[str, Any]:
        """What this model computes: part of a run's identity (the weight file's hash is checked
        separately, when the run resumes)."""
        checkpoint = str(Path(self.checkpoint).expanduser().resolve()) if self.checkpoint else None
        return {
            "key": self.key,
            "model": self.model,
            "pretrained": self.pretrained,
            "checkpoint": checkpoint,
            "kwargs": self.kwargs,
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
            "input_size": self.input_size,
        }


@dataclass(frozen=True)
class Weights:
    """Where a model's weights come from, recorded in run.json."""

    kind: str  # "checkpoint" | "hub" | "random"
    path: str | None = None
    sha256: str | None = None
    revision: str | None = None


def pretrained_cfg(spec: ModelSpec) -> dict[str, Any]:
    """The timm pretrained config of the tag: mean/std/input size always come from here."""
    arch, tag = timm.models.split_model_name_tag(spec.model)
    if not timm.is_model(arch):
        raise UserError(
            f"Unknown timm architecture {arch!r} for model {spec.key!r}. Check the name with "
            f"`python -c \"import timm; print(timm.list_models('{arch[:4]}*'))\"`."
        )
    try:
        cfg = timm.models.get_pretrained_cfg(spec.model) if tag else None
    except RuntimeError:  # timm raises for a tag it does not know
        cfg = None
    if tag and cfg is None:
        tags = [n for n in timm.list_pretrained(f"{arch}.*")]
        raise UserError(
            f"timm {timm.__version__} has no weight tag {spec.model!r} for model {spec.key!r}; "
            f"tags it has for {arch}: {tags or 'none'}."
        )
    if cfg is None:
        cfg = timm.models.get_pretrained_cfg(arch)
    return cfg.to_dict() if cfg is not None else {}


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _no_network_message(spec: ModelSpec, hub_id: str) -> str:
    return (
        f"Weights for {spec.key!r} ({spec.model}) are not in the local Hugging Face cache and "
        f"the hub cannot be reached from this machine. Fix one of: (1) on a connected machine run "
        f"`python -c \"import timm; timm.create_model('{spec.model}', pretrained=True)\"` and copy "
        f"its cache (HF_HOME, default ~/.cache/huggingface) here, or point HF_HOME at a shared "
        f"cache; (2) pass a local state dict with `checkpoint=<file.pth|file.safetensors>` for "
        f"this model (e.g. source.checkpoint=... or targets.{spec.key}.checkpoint=...). "
        f"Hub repository: {hub_id}."
    )


def resolve_weights(spec: ModelSpec) -> Weights:
    """Find (or download) the weight file for `spec` without building the model."""
    if spec.checkpoint is not None:
        path = Path(spec.checkpoint).expanduser()
        if not path.is_file():
            raise UserError(
                f"Checkpoint for {spec.key!r} not found: {path}. Pass an existing .pth/.pt or "
                f".safetensors file with checkpoint=<file>."
            )
        return Weights("checkpoint", str(path.resolve()), sha256_file(path))
    if spec.requires_checkpoint:
        raise MissingCheckpoint(
            f"Model {spec.key!r} ({spec.model}) has no weights in timm: provide a state dict for "
            f"the timm architecture with targets.{spec.key}.checkpoint=<file> (or "
            f"source.checkpoint=<file> when it is the source)."
        )
    if not spec.pretrained:
        return Weights("random")

    cfg = pretrained_cfg(spec)
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        raise UserError(
            f"The weights {spec.model!r} are not on the Hugging Face hub in timm "
            f"{timm.__version__}; pass checkpoint=<file> for {spec.key!r}."
        )
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    repo, _, revision = hub_id.partition("@")
    revision = revision or None
    for fname in _HUB_FILENAMES:
        hit = try_to_load_from_cache(repo, fname, revision=revision)
        if isinstance(hit, str):
            return Weights("hub", hit, sha256_file(hit), _snapshot_of(hit))
    # Not cached: hf_hub_download retries for ~45 s when offline, so probe the endpoint first.
    if not _hub_reachable():
        raise UserError(_no_network_message(spec, repo))
    for fname in _HUB_FILENAMES:
        try:
            path = hf_hub_download(repo, fname, revision=revision)
        except EntryNotFoundError:
            continue
        except Exception as e:  # network drops, auth, disk: all end the same way for the user
            raise UserError(f"{_no_network_message(spec, repo)} (download failed: {e})") from e
        return Weights("hub", path, sha256_file(path), _snapshot_of(path))
    raise UserError(f"Hub repository {repo} has none of {_HUB_FILENAMES} for {spec.key!r}.")


def _snapshot_of(path: str) -> str | None:
    parts = Path(path).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file, through timm's own reader (which unwraps
    `state_dict` / `model` / EMA entries and `module.` prefixes). Pickled files are read with
    `weights_only=True`, passed explicitly: older timm defaults to False, which would run code
    from the file."""
    try:
        state = timm.models.load_state_dict(path, weights_only=True)
    except (AttributeError, KeyError, TypeError) as e:  # readable, but not a mapping of tensors
        raise UserError(
            f"Checkpoint {path} is not a state dict ({type(e).__name__}: {str(e)[:200]}); save "
            f"one with torch.save(model.state_dict(), path)."
        ) from e
    except Exception as e:
        raise UserError(
            f"Cannot read checkpoint {path}: {type(e).__name__}: {str(e)[:300]}. Expected a state "
            f"dict saved with torch.save(model.state_dict(), ...) or safetensors.torch.save_file."
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(
            f"Checkpoint {path} is not a state dict (a mapping of parameter names to tensors); "
            f"save one with torch.save(model.state_dict(), path)."
        )
    return state


def _load_into(net: nn.Module, spec: ModelSpec, path: str) -> None:
    """A user's checkpoint, strictly: every key of the architecture and nothing else."""
    state = read_state_dict(path)
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise UserError(
            f"Checkpoint {path} does not fit {spec.model!r} for {spec.key!r}: "
            f"{str(e).splitlines()[-1].strip()[:300]}"
        ) from e
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise UserError(
            f"Checkpoint {path} does not fit {spec.model!r} for {spec.key!r}: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}. Is it for another architecture?"
        )


def _create(spec: ModelSpec, weights: Weights) -> nn.Module:
    """The timm network with `weights`. Hub weights go through timm's own pretrained path (its
    per-model checkpoint filters and label offsets apply); the file is read here, from the local
    cache, so timm never reaches for the network."""
    if weights.kind == "hub":
        overlay = {"state_dict": read_state_dict(weights.path)}
        try:
            return timm.create_model(
                spec.model, pretrained=True, pretrained_cfg_overlay=overlay, **spec.kwargs
            )
        except RuntimeError as e:
            raise UserError(
                f"The hub weights {weights.path} do not fit {spec.model!r} for {spec.key!r}: "
                f"{str(e).splitlines()[-1].strip()[:300]}"
            ) from e
    net = timm.create_model(spec.model, pretrained=False, **spec.kwargs)
    if weights.kind == "checkpoint":
        _load_into(net, spec, weights.path)
    return net


class PixelModel(nn.Module):
    """Takes [0,1] RGB pixels at any size: resizes to the model's input (bilinear) and
    normalizes with the model's own mean/std, so every model sees the same stored pixels."""

    def __init__(
        self,
        net: nn.Module,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        input_size: int,
        key: str = "",
    ) -> None:
        super().__init__()
        self.net = net
        self.key = key
        self.input_size = int(input_size)
        self.autocast: torch.dtype | None = None  # bf16 speed mode; None = the model's dtype
        self.channels_last = False
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
            )
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast is None:
            return self.net(x)
        with torch.autocast(x.device.type, dtype=self.autocast):
            return self.net(x).float()

    def set_speed(self, precision: str, channels_last: bool = False) -> PixelModel:
        """Opt-in speed modes: bf16 autocast; channels-last memory for convolutional nets."""
        self.autocast = torch.bfloat16 if precision == "bf16" else None
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        return self


@dataclass
class LoadedModel:
    spec: ModelSpec
    weights: Weights
    model: PixelModel

    def provenance(self) -> dict[str, Any]:
        return {
            "key": self.spec.key,
            "model": self.spec.model,
            "weights": self.weights.kind,
            "weight_file": self.weights.path,
            "sha256": self.weights.sha256,
            "hub_revision": self.weights.revision,
            "input_size": self.model.input_size,
            "mean": self.model.mean.flatten().tolist(),
            "std": self.model.std.flatten().tolist(),
        }


def build_model(
    spec: ModelSpec, weights: Weights, device: torch.device | str, seed: int = 0
) -> LoadedModel:
    """Create the timm architecture, load `weights` into it, wrap it for [0,1] pixels, eval().

    Random weights are drawn from a generator seeded by the model key and the run seed, so the
    same key is the same network as source and as target, in every run with that seed.
    """
    cfg = pretrained_cfg(spec)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(spec.key.encode()) ^ (seed & 0xFFFFFFFF))
            net = _create(spec, weights)
    except TypeError as e:
        raise UserError(f"Bad kwargs for {spec.model!r} ({spec.key!r}): {e}") from e
    size = spec.input_size or cfg.get("input_size", (3, 224, 224))[-1]
    mean = spec.mean or tuple(cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN))
    std = spec.std or tuple(cfg.get("std", timm.data.IMAGENET_DEFAULT_STD))
    model = PixelModel(net, mean, std, size, key=spec.key).eval().to(device)
    model.requires_grad_(False)  # attacks need d loss / d input only
    return LoadedModel(spec, weights, model)


def check_model_name(spec: ModelSpec) -> None:
    """Fail fast on names timm does not know, before weights are fetched."""
    pretrained_cfg(spec)
