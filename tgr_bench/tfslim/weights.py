"""Reading the converted TF-slim weight files without trusting their pickles.

The files the TGR paper evaluated with (released by the `ylhz/tf_to_pytorch_model` repository,
converted from TF-slim checkpoints with MMdnn) are `np.save` of a Python dict: TF layer name ->
{param name -> float32 array}. That is a pickle inside a .npy, and unpickling runs whatever
callables the pickle names, so `np.load(allow_pickle=True)` would hand a tampered download full
control of the machine. Here the pickle is read by an unpickler that resolves only the few
numpy globals such a file needs; anything else is refused before it can be called.

`convert` rewrites a file once as safetensors (no code at all in the format), with metadata
`format=tf2torch`, so later runs load no pickle.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import pickletools
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tgr_bench.atomic import atomic_write
from tgr_bench.errors import UserError

FORMAT = "tf2torch"  # safetensors metadata "format" of converted files
_SEP = "//"  # safetensors tensor name = "<TF layer name>//<param>"; TF names never hold "//"
_NPY_MAGIC = b"\x93NUMPY"
LayerArrays = dict[str, dict[str, np.ndarray]]


def _numpy_attr(modules: tuple[str, ...], name: str) -> Any:
    """numpy's own object, from its numpy-2 home (`numpy._core`) or numpy-1 one (`numpy.core`)."""
    for mod in modules:
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy provides none of {modules} . {name}")


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes: only (str, 'latin1')."""
    if not isinstance(obj, str) or encoding.lower() not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(
            f"_codecs.encode called with {type(obj).__name__}, {encoding!r}"
        )
    return obj.encode("latin1", errors)


_RECONSTRUCT = ("numpy._core.multiarray", "numpy.core.multiarray")
_NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")

# (module, name) -> resolver. Found by writing real files: np.save of a dict of arrays needs
# numpy's array reconstructor, ndarray and dtype (module `numpy.core` in numpy-1 and Python-2
# era pickles, `numpy._core` in numpy 2); pickle protocol 2 writers add `_codecs.encode` for
# raw bytes, protocol 5 `_frombuffer`.
_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    **{
        (m, "_reconstruct"): (lambda: _numpy_attr(_RECONSTRUCT, "_reconstruct"))
        for m in _RECONSTRUCT
    },
    **{(m, "_frombuffer"): (lambda: _numpy_attr(_NUMERIC, "_frombuffer")) for m in _NUMERIC},
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _RefusedGlobal(Exception):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only allow-listed numpy globals; the refusal happens before any call."""

    def find_class(self, module: str, name: str) -> Any:
        resolver = _ALLOWED.get((module, name))
        if resolver is None:
            raise _RefusedGlobal(module, name)
        return resolver()

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedGlobal("<persistent id>", repr(pid)[:60])


def _read_npy_header(f: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of a .npy (numpy parses the header without pickle)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    # numpy's own reader has no public function for version 3 headers (utf-8 field names),
    # which np.save writes only for structured dtypes: never a tf2torch file.
    raise ValueError(f"unsupported .npy version {version}")


def _decode_key(key: Any, path: Path) -> str:
    """Layer and param names as str; Python-2 era pickles may deliver them as bytes."""
    if isinstance(key, str):
        return key
    if isinstance(key, bytes):
        try:
            return key.decode("utf-8")
        except UnicodeDecodeError:
            return key.decode("latin1")
    raise UserError(
        f"{path} is not a tf2torch weight file: it holds a key of type {type(key).__name__} "
        "where layer and array names should be. Re-download the converted .npy file."
    )


def _validated(obj: Any, path: Path) -> LayerArrays:
    """The unpickled payload as {layer: {param: float array}}, or a UserError saying why not."""
    if not isinstance(obj, dict) or not obj:
        raise UserError(
            f"{path} is not a tf2torch weight file: its pickle holds "
            f"{type(obj).__name__ if not isinstance(obj, dict) else 'an empty dict'}, not a "
            "dict of layers. Re-download the converted .npy file."
        )
    out: LayerArrays = {}
    for layer, params in obj.items():
        lname = _decode_key(layer, path)
        if not isinstance(params, dict):
            raise UserError(
                f"{path} is not a tf2torch weight file: layer {lname!r} holds "
                f"{type(params).__name__}, not a dict of arrays. Re-download the file."
            )
        arrays: dict[str, np.ndarray] = {}
        for pname, arr in params.items():
            p = _decode_key(pname, path)
            if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
                what = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
                raise UserError(
                    f"{path} is not a tf2torch weight file: {lname}:{p} holds {what}, not a "
                    "floating-point array. Re-download the converted .npy file."
                )
            arrays[p] = arr
        out[lname] = arrays
    return out


def _read_npy(path: Path) -> LayerArrays:
    with open(path, "rb") as f:
        try:
            shape, _, dtype = _read_npy_header(f)
        except ValueError as e:
            raise UserError(f"{path} is not a readable .npy file ({e}).") from e
        if not dtype.hasobject or shape != ():
            raise UserError(
                f"{path} holds a plain {dtype} array of shape {shape}, not the dict of layers a "
                "tf2torch weight file holds. Pass the converted .npy file of the model."
            )
        # latin1 is how numpy reads Python-2 pickles: py2 str keys come out as str and py2
        # array bytes as numpy expects them. Python-3 pickles are unaffected by it.
        unpickler = _SafeUnpickler(f, encoding="latin1")
        try:
            obj = unpickler.load()
        except _RefusedGlobal as e:
            raise UserError(
                f"Refusing to load {path}: its pickle asks for {e.qualname!r}, which a tf2torch "
                "weight file never needs (it holds only numpy arrays in dicts), so the file is "
                "not one or has been tampered with. Nothing it asked for was run. Re-download "
                "the converted file from the ylhz/tf_to_pytorch_model release v1.0 and check it."
            ) from None
        except (
            pickle.UnpicklingError,
            EOFError,
            ValueError,
            TypeError,
            AttributeError,
            IndexError,
            KeyError,
            struct.error,
        ) as e:
            raise UserError(
                f"{path} is not a readable tf2torch weight file: its pickle is damaged ({e}). "
                "Re-download it."
            ) from None
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.shape == ():
        obj = obj.item()
    return _validated(obj, path)


def _safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The `__metadata__` of a safetensors file, or None if the file is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000 or n > os.path.getsize(path) - 8:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else None


def _read_safetensors(path: Path) -> LayerArrays:
    from safetensors.numpy import load_file

    out: LayerArrays = {}
    for name, arr in load_file(str(path)).items():
        layer, sep, param = name.rpartition(_SEP)
        if not sep or not layer or not param:
            raise UserError(
                f"{path} is marked format={FORMAT} but holds tensor {name!r}, not named "
                f"'<layer>{_SEP}<param>'. Convert the .npy file again."
            )
        out.setdefault(layer, {})[param] = arr
    return out


def read_weights(path: str | Path) -> LayerArrays:
    """{TF layer name: {param: array}} from a tf2torch .npy or a converted .safetensors.

    The format is detected from the content, not the file name. The .npy pickle is read with
    an allow-list of numpy globals; anything else raises UserError and nothing of it runs.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
    except OSError as e:
        raise UserError(f"Cannot read weight file {path}: {e}.") from e
    if magic == _NPY_MAGIC:
        return _read_npy(path)
    meta = _safetensors_metadata(path)
    if meta is not None and meta.get("format") == FORMAT:
        return _read_safetensors(path)
    raise UserError(
        f"{path} is neither a tf2torch .npy file (a pickled dict of TF layers) nor a "
        f".safetensors file written by its conversion (metadata format={FORMAT}). Pass the "
        "converted TF-slim weight file of the model (e.g. tf2torch_inception_v3.npy)."
    )


def _npy_holds_pickled_dict(path: Path) -> bool:
    """A cheap look: a 0-d object .npy whose pickle starts building a dict early on."""
    with open(path, "rb") as f:
        try:
            shape, _, dtype = _read_npy_header(f)
        except ValueError:
            return False
        if not dtype.hasobject or shape != ():
            return False
        prefix = f.read(1 << 16)
    # The 0-d object array's payload (inside the list numpy pickles object data as) is the
    # first container built after the header globals: for a tf2torch file the layer dict.
    try:
        for op, _, _ in pickletools.genops(io.BytesIO(prefix)):
            if op.name == "EMPTY_DICT":
                return True
            if op.name == "STOP":
                return False
    except (ValueError, EOFError):
        return False
    return False


def is_tf2torch_file(path: str | Path) -> bool:
    """True for a tf2torch .npy (pickled dict) or a safetensors converted by `convert`.

    Decided by the content, not the name; a plain (e.g. timm) safetensors file is False.
    Never unpickles anything.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
    except OSError:
        return False
    if magic == _NPY_MAGIC:
        return _npy_holds_pickled_dict(path)
    meta = _safetensors_metadata(path)
    return meta is not None and meta.get("format") == FORMAT


def write_safetensors(path: str | Path, weights: LayerArrays, metadata: dict[str, str]) -> None:
    """Atomically writes `weights` as safetensors (tensor '<layer>//<param>') with metadata."""
    from safetensors.numpy import save

    path = Path(path)
    tensors = {}
    for layer, params in weights.items():
        for p, arr in params.items():
            tensors[f"{layer}{_SEP}{p}"] = np.ascontiguousarray(arr)
    meta = {**metadata, "format": FORMAT}
    atomic_write(path, save(tensors, metadata=meta))
