"""Models that take [0,1] pixels, with the exact weights a config names: timm models, and the
TF-slim networks of tgr_bench.tfslim for the converted TF-slim weights the paper's CNN and
defended targets used.

Weights come from one of four places, resolved *before* any model is built so that a missing
file stops the run in seconds: a local checkpoint (`checkpoint=`: a timm state dict, or a
converted TF-slim file, told apart by content), a folder of converted TF-slim files
(`tf2torch_dir=`), the Hugging Face cache (filled on first use when the hub is reachable), or
nowhere (`pretrained: false`, seeded random weights, for the tiny test models).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
import torch.nn.functional as F
from torch import nn

from tgr_bench import schema
from tgr_bench.errors import UserError
from tgr_bench.hashing import sha256_file
from tgr_bench.tfslim import FILES as TFSLIM_FILES
from tgr_bench.tfslim import build_network as build_tfslim_network
from tgr_bench.tfslim import is_tf2torch_file
from tgr_bench.tfslim import read_weights as read_tfslim_weights
from tgr_bench.tfslim.testing import random_weights as random_tfslim_weights

log = logging.getLogger(__name__)

# timm writes its hub weights under one of these names; the first found wins, as in timm.
_HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")


class MissingCheckpoint(UserError):
    """A model whose weights exist only as a file was listed without one."""


TF2TORCH_SOURCE = (
    "github.com/ylhz/tf_to_pytorch_model, release v1.0 (the TF-slim checkpoints converted to "
    "PyTorch that the TGR paper's evaluation used)"
)
# Preprocessing of every TF-slim network: RGB at 299x299, scaled to [-1, 1] (x * 2 - 1).
TFSLIM_INPUT = {"input_size": (3, 299, 299), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def _checkpoint(name: str, value: Any) -> str | None:
    """A weight file path; an empty value (an unset shell variable) means none."""
    if value in ("", None):
        return None
    if isinstance(value, bool | dict | list):
        raise UserError(f"{name}={value!r}: need the path of a weight file.")
    return str(value)


@dataclass(frozen=True)
class ModelSpec:
    """One model entry of the catalogue (`conf/source/<key>.yaml`, also a target): a file
    states only what differs from these defaults."""

    key: str = schema.key("", help="the catalogue key (the file name), e.g. vit_base")
    model: str | None = schema.key(
        None, help="timm name with weight tag, e.g. vit_base_patch16_224.augreg_in21k_ft_in1k"
    )
    tfslim: str | None = schema.key(
        None, help="TF-slim key whose converted weights (.npy) fit it: used with tf2torch_dir="
    )
    pretrained: bool = schema.key(True, help="false: seeded random weights (tiny test models)")
    checkpoint: str | None = schema.key(
        None,
        parse=_checkpoint,
        help="a local file instead: a timm state dict, or converted TF-slim weights",
    )
    kwargs: dict[str, Any] = schema.key(
        {}, help="extra timm.create_model arguments (tiny test architectures)"
    )
    copy_of: str | None = schema.key(
        None, help="a relative of this key: its seeded random weights plus noise (smoke)"
    )
    noise: float = schema.key(
        0.0, low=0, help="... Gaussian, this many times each tensor's standard deviation"
    )
    mean: tuple[float, ...] | None = schema.key(
        None, help="null: from the weight tag's pretrained config"
    )
    std: tuple[float, ...] | None = schema.key(None)
    input_size: int | None = schema.key(None, low=1)
    torchvision: str | None = schema.key(
        None, help="torchvision weights of `model` (its builder), e.g. IMAGENET1K_V2: torchvision"
    )
    robustbench: str | None = schema.key(
        None, help="RobustBench ImageNet L-inf model name, e.g. Salman2020Do_R50 (robust extra)"
    )
    model_dir: str = schema.key(
        "models",
        needs="robustbench",
        help="robustbench: the folder of imagenet/Linf/<name>.pt (robustbench's own)",
    )

    def check(self, where: str) -> None:
        if not self.key:
            raise UserError(f"{where}.key is empty: a model entry names its catalogue key.")
        if self.model is None and self.tfslim is None and self.robustbench is None:
            raise UserError(
                f"Model entry {self.key!r} names neither a timm model (model=) nor TF-slim "
                f"weights (tfslim=); see tgr-bench-list."
            )
        if self.copy_of is not None and (self.pretrained or self.checkpoint or self.tfslim):
            raise UserError(
                f"Model entry {self.key!r}: copy_of= derives from seeded random weights only "
                f"(pretrained: false, no checkpoint, no tfslim)."
            )
        extra = "robustbench" if self.robustbench else "torchvision" if self.torchvision else None
        mixed = [
            k
            for k in ("checkpoint", "tfslim", "copy_of", "torchvision")
            if extra and k != extra and getattr(self, k) is not None
        ]
        if mixed:
            raise UserError(
                f"Model entry {self.key!r}: {extra}= loads its own weights, so "
                f"{', '.join(f'{k}=' for k in mixed)} would silently not apply; drop "
                f"{' and '.join(mixed)}, or use a timm model= entry for a local checkpoint."
            )
        if self.tfslim is not None and self.tfslim not in TFSLIM_FILES:
            raise UserError(
                f"Model entry {self.key!r}: tfslim={self.tfslim!r} is not a TF-slim key; the "
                f"keys are {', '.join(TFSLIM_FILES)}."
            )

    @classmethod
    def of(cls, entry: Any, key: str | None = None, where: str = "source") -> ModelSpec:
        """A checked entry from a config mapping; `key` names it (a target's key in targets=)."""
        values = dict(schema.plain(entry))
        if key is not None:
            values["key"] = key
        return schema.parse(cls, values, where)

    @property
    def arch(self) -> str:
        """The name that tells the architecture: the timm name, else the TF-slim key."""
        return self.model or self.robustbench or str(self.tfslim)

    def identity(self) -> dict[str, Any]:
        """What this model computes: part of a run's identity (the weight file's hash is checked
        separately, when the run resumes)."""
        checkpoint = str(Path(self.checkpoint).expanduser().resolve()) if self.checkpoint else None
        return {
            "key": self.key,
            "model": self.model,
            **({"tfslim": self.tfslim} if self.tfslim else {}),
            "pretrained": self.pretrained,
            "checkpoint": checkpoint,
            "kwargs": self.kwargs,
            **({"copy_of": self.copy_of, "noise": self.noise} if self.copy_of else {}),
            **({"torchvision": self.torchvision} if self.torchvision else {}),
            **({"robustbench": self.robustbench} if self.robustbench else {}),
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
            "input_size": self.input_size,
        }


@dataclass(frozen=True)
class WeightFile:
    """Where a model's weights come from, recorded in run.json."""

    kind: str  # "checkpoint" | "hub" | "tf2torch" | "random"
    path: str | None = None
    sha256: str | None = None
    revision: str | None = None


# The catalogue's tags (tnt_s_legacy_patch16_224, test_resnet, ...) exist from this timm on. The
# package admits older ones because robustbench 1.1.1 (the robust extra) pins timm 1.0.9.
TIMM_FOR_CATALOGUE = (1, 0, 16)


def _old_timm() -> str:
    have = tuple(int(p) for p in re.findall(r"\d+", timm.__version__)[:3])
    if have >= TIMM_FOR_CATALOGUE:
        return ""
    need = ".".join(map(str, TIMM_FOR_CATALOGUE))
    return (
        f" This is timm {timm.__version__} (robustbench pins 1.0.9); the catalogue needs timm >= "
        f"{need}: pip install -U 'timm>={need}' (robustbench's ImageNet models work with it)."
    )


def pretrained_cfg(spec: ModelSpec) -> dict[str, Any]:
    """The timm pretrained config of the tag: mean/std/input size always come from here (the
    TF-slim preprocessing for a model that is TF-slim only)."""
    if spec.model is None:
        return dict(TFSLIM_INPUT)
    arch, tag = timm.models.split_model_name_tag(spec.model)
    if not timm.is_model(arch):
        raise UserError(
            f"Unknown timm architecture {arch!r} for model {spec.key!r}. Check the name with "
            f"`python -c \"import timm; print(timm.list_models('{arch[:4]}*'))\"`.{_old_timm()}"
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


def tf2torch_file(folder: str | os.PathLike[str], spec: ModelSpec) -> Path:
    """The converted TF-slim file of `spec` in `folder`: its safetensors conversion first (no
    pickle to read), then the released `tf2torch_*.npy`, then the public `tf_*.npy` name."""
    assert spec.tfslim is not None
    names = TFSLIM_FILES[spec.tfslim]
    candidates = [
        Path(names.released_name).with_suffix(".safetensors").name,
        names.released_name,
        names.public_name,
        Path(names.public_name).with_suffix(".safetensors").name,
    ]
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"tf2torch_dir={folder} is not a folder of converted TF-slim weights.")
    for name in candidates:
        if (root / name).is_file():
            return root / name
    raise MissingCheckpoint(
        f"No converted TF-slim weights for {spec.key!r} in {root}: looked for "
        f"{', '.join(candidates)}. They are published at {TF2TORCH_SOURCE}; or pass this model "
        f"its own file with targets.{spec.key}.checkpoint=<file> (source.checkpoint= for a source)."
    )


def _tf2torch_weights(path: Path, spec: ModelSpec) -> WeightFile:
    if spec.tfslim is None:
        raise UserError(
            f"{path} holds converted TF-slim weights, but {spec.key!r} is the timm model "
            f"{spec.model}; TF-slim weights fit the keys {', '.join(TFSLIM_FILES)}."
        )
    return WeightFile("tf2torch", str(path.absolute()), sha256_file(path))


def resolve_weights(spec: ModelSpec, tf2torch_dir: str | None = None) -> WeightFile:
    """Find (or download) the weight file for `spec` without building the model. A model's own
    `checkpoint=` wins over `tf2torch_dir`; its format is read from its content."""
    if spec.checkpoint is not None:
        return _checkpoint_weights(spec)
    if spec.robustbench is not None or spec.torchvision is not None:
        return _extra_weights(spec)
    if tf2torch_dir and spec.tfslim is not None:
        return _tf2torch_weights(tf2torch_file(tf2torch_dir, spec), spec)
    if not spec.pretrained:
        return WeightFile("random")
    if spec.model is None:
        names = TFSLIM_FILES[str(spec.tfslim)]
        raise MissingCheckpoint(
            f"Model {spec.key!r} exists only as converted TF-slim weights "
            f"({names.released_name} or {names.public_name}, published at {TF2TORCH_SOURCE}). "
            f"Pass the folder that holds them with tf2torch_dir=<folder>, or the file with "
            f"targets.{spec.key}.checkpoint=<file> (source.checkpoint=<file> for a source)."
        )
    return _hub_weights(spec)


def _checkpoint_weights(spec: ModelSpec) -> WeightFile:
    path = Path(str(spec.checkpoint)).expanduser()
    if not path.is_file():
        raise UserError(
            f"Checkpoint for {spec.key!r} not found: {path}. Pass an existing .pth/.pt or "
            f".safetensors file with checkpoint=<file>."
        )
    if is_tf2torch_file(path):
        return _tf2torch_weights(path, spec)
    if spec.model is None:
        raise UserError(
            f"{path} is not a converted TF-slim weight file, which {spec.key!r} needs (a "
            f"{TFSLIM_FILES[str(spec.tfslim)].released_name} from {TF2TORCH_SOURCE}, or its "
            f"conversion by `tgr-bench-prepare convert-tf2torch`)."
        )
    return WeightFile("checkpoint", str(path.resolve()), sha256_file(path))


def _hub_weights(spec: ModelSpec) -> WeightFile:
    """The tag's file from the Hugging Face cache, downloaded into it when the hub is reachable."""
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
            return WeightFile("hub", hit, sha256_file(hit), _snapshot_of(hit))
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
        return WeightFile("hub", path, sha256_file(path), _snapshot_of(path))
    raise UserError(f"Hub repository {repo} has none of {_HUB_FILENAMES} for {spec.key!r}.")


def _snapshot_of(path: str) -> str | None:
    parts = Path(path).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def _short(error: BaseException, limit: int = 240) -> str:
    """An exception's message on one line, cut at a word boundary (torch's are paragraphs)."""
    text = " ".join(str(error).split())
    if len(text) <= limit:
        return text
    return text[: text.rfind(" ", 0, limit)] + " ..."


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file, through timm's own reader (which unwraps
    `state_dict` / `model` / EMA entries and `module.` prefixes). Pickled files are read with
    `weights_only=True`, passed explicitly: older timm defaults to False, which would run code
    from the file."""
    try:
        state = timm.models.load_state_dict(path, weights_only=True)
    except (AttributeError, KeyError, TypeError) as e:  # readable, but not a mapping of tensors
        raise UserError(
            f"Checkpoint {path} is not a state dict ({type(e).__name__}: {_short(e)}); save "
            f"one with torch.save(model.state_dict(), path)."
        ) from e
    except Exception as e:
        raise UserError(
            f"Cannot read checkpoint {path}: {type(e).__name__}: {_short(e)} Expected a state "
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


def _tfslim_network(spec: ModelSpec, weights: WeightFile, seed: int) -> nn.Module:
    """The TF-slim network of `spec`: from its converted file (read without running any pickle
    code), or with seeded random weights in the files' own layout (tests and benchmarks). These
    weights never pass through timm: they keep their 1001 classes (label_offset = 1)."""
    assert spec.tfslim is not None
    if weights.kind == "random":
        arrays = random_tfslim_weights(spec.tfslim, seed=zlib.crc32(spec.key.encode()) ^ seed)
    else:
        arrays = read_tfslim_weights(str(weights.path))
    return build_tfslim_network(spec.tfslim, arrays)


@torch.no_grad()
def _add_noise(net: nn.Module, scale: float, seed: int) -> None:
    """Every parameter plus N(0, (scale * its own std)^2), from a generator seeded here."""
    g = torch.Generator().manual_seed(seed & 0xFFFFFFFF)
    for p in net.parameters():
        if p.numel() > 1 and p.is_floating_point():
            p.add_(torch.randn(p.shape, generator=g) * (scale * float(p.std())))


def _create(spec: ModelSpec, weights: WeightFile) -> nn.Module:
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
        label_offset: int = 0,
    ) -> None:
        super().__init__()
        self.net = net
        self.key = key
        # Logit index of ImageNet class 0: 1 for the TF-slim networks, whose logit 0 is a
        # background class. Evaluation predicts argmax - label_offset (background = -1, a wrong
        # answer) and attacks take the loss at logit y + label_offset, as the released code.
        self.label_offset = int(label_offset)
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
    weights: WeightFile
    model: PixelModel

    def provenance(self) -> dict[str, Any]:
        return {
            "key": self.spec.key,
            "model": self.spec.model,
            "copy_of": self.spec.copy_of,
            "noise": self.spec.noise if self.spec.copy_of else None,
            "weights": self.weights.kind,
            "weight_file": self.weights.path,
            "sha256": self.weights.sha256,
            "hub_revision": self.weights.revision,
            "tfslim": self.spec.tfslim if self.weights.kind == "tf2torch" else None,
            "label_offset": self.model.label_offset,
            "input_size": self.model.input_size,
            "mean": self.model.mean.flatten().tolist(),
            "std": self.model.std.flatten().tolist(),
        }


def build_model(
    spec: ModelSpec, weights: WeightFile, device: torch.device | str, seed: int = 0
) -> LoadedModel:
    """Create the architecture (timm, or TF-slim for converted TF-slim weights), load `weights`
    into it, wrap it for [0,1] pixels, eval().

    Random weights are drawn from a generator seeded by the model key and the run seed, so the
    same key is the same network as source and as target, in every run with that seed.
    """
    if spec.robustbench is not None:
        # The file robustbench loaded (downloaded now, when it was missing), with its hash.
        robust = _robust().load_robust_model(
            spec.robustbench, spec.model_dir, device, spec.input_size, weights
        )
        return LoadedModel(spec, robust.weights, robust.model)
    if spec.torchvision is not None:
        return LoadedModel(spec, weights, _torchvision_model(spec, weights, device, seed))
    tfslim = weights.kind == "tf2torch" or spec.model is None
    cfg = dict(TFSLIM_INPUT) if tfslim else pretrained_cfg(spec)
    try:
        if tfslim:
            net = _tfslim_network(spec, weights, seed & 0xFFFFFFFF)
        else:
            with torch.random.fork_rng(devices=[]):
                start = spec.copy_of or spec.key  # a relative starts from its original's weights
                torch.manual_seed(zlib.crc32(start.encode()) ^ (seed & 0xFFFFFFFF))
                net = _create(spec, weights)
                if spec.copy_of:
                    _add_noise(net, spec.noise, zlib.crc32(spec.key.encode()) ^ seed)
    except TypeError as e:
        raise UserError(f"Bad kwargs for {spec.model!r} ({spec.key!r}): {e}") from e
    size = spec.input_size or cfg.get("input_size", (3, 224, 224))[-1]
    mean = spec.mean or tuple(cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN))
    std = spec.std or tuple(cfg.get("std", timm.data.IMAGENET_DEFAULT_STD))
    offset = int(getattr(net, "label_offset", 0)) if tfslim else 0
    model = PixelModel(net, mean, std, size, key=spec.key, label_offset=offset)
    model = model.eval().to(device)
    model.requires_grad_(False)  # attacks need d loss / d input only
    return LoadedModel(spec, weights, model)


def check_model_name(spec: ModelSpec) -> None:
    """Fail fast on names timm does not know, before weights are fetched (TF-slim keys were
    checked when the spec was made)."""
    if spec.robustbench is not None or spec.torchvision is not None:
        _torchvision_weights(spec) if spec.torchvision else _robust().check_robust_name(spec)
        return
    pretrained_cfg(spec)


# ---- models of the optional extras: torchvision weights, RobustBench -----------------------
TORCHVISION_INSTALL = 'pip install "tgr-bench[torchvision]"'


def _robust() -> Any:
    from tgr_bench import robust  # imports models: loaded only when a RobustBench key is used

    return robust


def _torchvision_weights(spec: ModelSpec) -> Any:
    """The torchvision weights enum of `spec` (builder `model`, weights `torchvision`)."""
    try:
        from torchvision.models import get_model_builder, get_model_weights
    except ImportError as e:
        raise UserError(f"{spec.key!r} uses torchvision weights: {TORCHVISION_INSTALL}.") from e
    try:
        get_model_builder(str(spec.model))
        enum = get_model_weights(str(spec.model))
    except ValueError as e:
        raise UserError(f"{spec.key!r}: torchvision has no model {spec.model!r}.") from e
    if spec.torchvision not in enum.__members__:
        raise UserError(
            f"{spec.key!r}: torchvision has no weights {spec.torchvision!r} for {spec.model}; "
            f"it has {', '.join(enum.__members__)}."
        )
    return enum[spec.torchvision]


def _extra_weights(spec: ModelSpec) -> WeightFile:
    """The weight file of a torchvision or RobustBench model: found in its cache, or fetched
    when the network is there; else one line saying where to put it."""
    if spec.robustbench is not None:
        return _robust().robust_weights(spec)
    if not spec.pretrained:
        return WeightFile("random")
    weights = _torchvision_weights(spec)
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if not path.is_file():
        host = urlparse(weights.url).hostname or ""
        try:
            socket.create_connection((host, 443), timeout=3.0).close()
        except OSError as e:
            raise UserError(
                f"The torchvision weights of {spec.key!r} are not at {path} and {host} cannot "
                f"be reached: download {weights.url} and copy it to that path."
            ) from e
        torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True)
    return WeightFile("torchvision", str(path), sha256_file(path))


def _torchvision_model(
    spec: ModelSpec, weights: WeightFile, device: torch.device | str, seed: int = 0
) -> PixelModel:
    """A torchvision model with its weights' own preprocessing (mean, std, crop size); eval
    mode, no parameter gradients."""
    from torchvision.models import get_model

    enum = _torchvision_weights(spec)
    with torch.random.fork_rng(devices=[]):  # random weights: seeded as build_model seeds timm's
        torch.manual_seed(zlib.crc32(spec.key.encode()) ^ (seed & 0xFFFFFFFF))
        net = get_model(str(spec.model), weights=None, **spec.kwargs)
    if weights.kind == "torchvision":
        net.load_state_dict(torch.load(str(weights.path), map_location="cpu", weights_only=True))
    prep = enum.transforms()
    size = spec.input_size or int(prep.crop_size[0])
    mean, std = spec.mean or tuple(prep.mean), spec.std or tuple(prep.std)
    model = PixelModel(net, mean, std, size, key=spec.key).eval().to(device)
    return model.requires_grad_(False)
