"""TF-slim networks for the converted weight files: structure, padding, loading, safety.

Full-size random weights per architecture family, in the converted files' layout (two of them
written as .npy files once per test session, to test the file format); the networks are built
from them and run on CPU. Numbers checked against TF-slim's definitions are derived by hand in
the comments.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from tgr_bench.errors import UserError
from tgr_bench.tfslim import (
    FILES,
    RESNET_V2_UNITS,
    TFSamePad,
    build_network,
    consumed_report,
    convert,
    create_network,
    expected_layers,
    is_tf2torch_file,
    key_for_weights,
    layer_names,
    load_network,
    read_weights,
    same_padding,
    skipped_layers,
)
from tgr_bench.tfslim.testing import random_weights, write_npy

FAMILY_KEYS = ("inc_v3", "inc_v4", "incres_v2", "res_v2_50")

# Layers per file, counted in the MMdnn-generated modules of the converter's repository
# (conv + batch norm + dense layers, aux classifier included).
LAYERS_PER_ARCHITECTURE = {
    "inception_v3": 194,
    "inception_v4": 304,
    "inception_resnet_v2": 454,
    "resnet_v2_50": 103,
    "resnet_v2_101": 205,
    "resnet_v2_152": 307,
}


@pytest.fixture(scope="session")
def weights() -> dict[str, dict]:
    # In memory: the file layout itself is tested on the two files of the npy_files fixture.
    return {k: random_weights(k, seed=7) for k in FAMILY_KEYS}


@pytest.fixture(scope="session")
def nets(weights: dict[str, dict]) -> dict[str, nn.Module]:
    return {k: build_network(k, w) for k, w in weights.items()}


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 299, 299, generator=g) * 2 - 1


@pytest.fixture(scope="session")
def logits(nets: dict[str, nn.Module], images: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {k: net(images) for k, net in nets.items()}


# ---------------------------------------------------------------------------------------------
# Networks


@pytest.mark.slow
@pytest.mark.parametrize("key", FAMILY_KEYS)
def test_network_runs_at_batch_1_and_2(
    key: str, nets: dict, images: torch.Tensor, logits: dict
) -> None:
    net = nets[key]
    assert not net.training
    assert net.label_offset == 1 and net.num_classes == 1001
    out = logits[key]
    assert out.shape == (2, 1001) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Real, input-dependent outputs of order one (not a constant or a blown-up sum).
    assert 0.01 < out.std().item() < 100
    assert (out[0] - out[1]).abs().max() > 1e-3
    with torch.no_grad():
        for i in range(2):
            single = net(images[i : i + 1])
            assert single.shape == (1, 1001)
            torch.testing.assert_close(single[0], out[i], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("key", FAMILY_KEYS)
def test_every_array_is_consumed_and_aux_skipped_by_name(
    key: str, weights: dict, nets: dict
) -> None:
    w = weights[key]
    arch = FILES[key].architecture
    rep = consumed_report(key, w)
    assert rep["layers_in_file"] == len(w) == LAYERS_PER_ARCHITECTURE[arch]
    assert rep["arrays_in_file"] == sum(len(p) for p in w.values())
    assert rep["values_in_file"] == sum(a.size for p in w.values() for a in p.values())
    assert rep["arrays_read"] + rep["arrays_skipped"] == rep["arrays_in_file"]
    assert rep["values_read"] + rep["values_skipped"] == rep["values_in_file"]
    prefix = FILES[key].prefix
    if arch.startswith("resnet"):
        assert rep["skipped_layers"] == [] and rep["arrays_read"] == rep["arrays_in_file"]
    else:
        # The five AuxLogits layers: conv 1x1 + BN, conv 5x5 + BN, classifier.
        assert len(rep["skipped_layers"]) == 5
        assert all(n.startswith(f"{prefix}/AuxLogits/") for n in rep["skipped_layers"])
        assert rep["skipped_layers"] == sorted(skipped_layers(key))
        assert rep["arrays_skipped"] == 10  # 1 + 3 + 1 + 3 + 2 arrays (no BN gamma in Inception)
    # Every parameter and statistic of the network is one value of the file, and vice versa
    # (the Inception files have no batch-norm gamma: those are fixed to 1, not read).
    net = nets[key]
    held = sum(
        t.numel()
        for n, t in [*net.named_parameters(), *net.named_buffers()]
        if not n.endswith("num_batches_tracked")
    )
    gammas = sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert rep["values_read"] == (held if arch.startswith("resnet") else held - gammas)


@pytest.mark.slow
def test_loaded_values_are_the_files(weights: dict, nets: dict) -> None:
    net, w = nets["res_v2_50"], weights["res_v2_50"]
    unit = net.blocks[0][0]
    torch.testing.assert_close(
        unit.conv1.weight,
        torch.from_numpy(w["resnet_v2_50/block1/unit_1/bottleneck_v2/conv1/Conv2D"]["weights"]),
    )
    bn = w["resnet_v2_50/block1/unit_1/bottleneck_v2/preact/FusedBatchNorm"]
    torch.testing.assert_close(unit.preact.running_var, torch.from_numpy(bn["var"]))
    torch.testing.assert_close(unit.preact.weight, torch.from_numpy(bn["scale"]))
    inc = nets["inc_v3"].features["Mixed_5b"].branches[1][1]
    wv = weights["inc_v3"]["InceptionV3/InceptionV3/Mixed_5b/Branch_1/Conv2d_0b_5x5/Conv2D"]
    torch.testing.assert_close(inc.conv.weight, torch.from_numpy(wv["weights"]))
    # Inception batch norms have no gamma in the files: scale 1.
    assert torch.equal(inc.bn.weight, torch.ones(64))


@pytest.mark.parametrize("key", list(FILES))
def test_layer_names_of_every_file(key: str) -> None:
    f = FILES[key]
    names = layer_names(key)
    assert len(names) == len(set(names)) == LAYERS_PER_ARCHITECTURE[f.architecture]
    assert all(n.startswith(f"{f.prefix}/") for n in names)
    # Variants of one architecture differ only in the prefix.
    base = next(k for k, g in FILES.items() if g.architecture == f.architecture)
    base_prefix = FILES[base].prefix
    if f.architecture.startswith("inception"):
        body = [n for n in names if "/AuxLogits/" not in n and "/Logits/" not in n]
        assert all(n.startswith(f"{f.prefix}/{f.prefix}/") for n in body)
    expect = [n.replace(base_prefix, f.prefix) for n in layer_names(base)]
    assert names == expect
    assert key_for_weights({n: {} for n in names}) == key


@pytest.mark.parametrize("key", ["res_v2_50", "res_v2_101", "res_v2_152"])
def test_resnet_block_counts(key: str) -> None:
    net = create_network(key)
    depth = int(key.rsplit("_", 1)[1])
    assert tuple(len(stage) for stage in net.blocks) == RESNET_V2_UNITS[depth]
    # 3 convs per unit + 4 projection shortcuts + stem conv + logits; 3 BN per unit + postnorm.
    n_units = sum(RESNET_V2_UNITS[depth])
    kinds = [s.kind for s in expected_layers(key).values()]
    assert kinds.count("conv") == 3 * n_units + 4 + 2
    assert kinds.count("bn") == 3 * n_units + 1


# ---------------------------------------------------------------------------------------------
# TF padding and stride placement, by hand


def test_same_padding_is_tf_same() -> None:
    # out = ceil(n / s); total = max((out - 1) * s + k - n, 0); the odd pixel goes after.
    assert same_padding(8, 3, 2) == (0, 1)  # out 4: 3*2 + 3 - 8 = 1
    assert same_padding(7, 3, 2) == (1, 1)  # out 4: 3*2 + 3 - 7 = 2
    assert same_padding(150, 3, 2) == (0, 1)  # ResNet stem pool: out 75, 74*2 + 3 - 150 = 1
    assert same_padding(35, 3, 1) == (1, 1)
    assert same_padding(4, 2, 1) == (0, 1)
    assert same_padding(5, 1, 2) == (0, 0)


def test_asymmetric_same_conv_by_hand() -> None:
    # A 3x3 all-ones stride-2 conv on a 4x4 ramp (0..15): TF pads 0 top/left, 1 bottom/right.
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    conv = nn.Conv2d(1, 1, 3, 2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        out = conv(TFSamePad(3, 2)(x))
    # rows 0-2/cols 0-2: 0+1+2+4+5+6+8+9+10 = 45; rows 0-2/cols 2-3 (+pad): 2+3+6+7+10+11 = 39
    # rows 2-3/cols 0-2: 8+9+10+12+13+14 = 66;     rows 2-3/cols 2-3: 10+11+14+15 = 50
    assert out.tolist() == [[[[45.0, 39.0], [66.0, 50.0]]]]
    # PyTorch's symmetric padding would center differently: the first window would hold a pad.
    assert nn.functional.conv2d(x, conv.weight, stride=2, padding=1)[0, 0, 0, 0] != 45.0


def test_resnet_stem_pool_pads_bottom_right_with_minus_inf() -> None:
    pool1 = create_network("res_v2_50").pool1  # no parameters: runs on CPU tensors
    x = -(torch.arange(16.0) + 1).reshape(1, 1, 4, 4)  # all negative: a zero pad would win
    # Windows: rows 0-2/cols 0-2 -> -1, rows 0-2/cols 2-3 -> -3, rows 2-3/cols 0-2 -> -9,
    # rows 2-3/cols 2-3 -> -11 (the padded row/column never wins).
    assert pool1(x).tolist() == [[[[-1.0, -3.0], [-9.0, -11.0]]]]
    assert pool1(torch.zeros(1, 1, 150, 150)).shape[-1] == 75


@pytest.mark.parametrize("key", ["res_v2_50", "res_v2_101", "res_v2_152"])
def test_resnet_strides_in_last_unit_of_blocks_1_to_3(key: str) -> None:
    net = create_network(key)  # meta device: shapes propagate without computing
    sizes: list[list[int]] = []
    for stage in net.blocks:
        sizes.append([])
        for unit in stage:
            unit.register_forward_hook(lambda m, i, o, s=sizes[-1]: s.append(o.shape[-1]))
    stem = net.pool1(net.conv1(torch.empty(1, 3, 299, 299, device="meta")))
    assert stem.shape[-1] == 75  # conv1: (299 + 6 - 7) // 2 + 1 = 150; SAME pool: 75
    net(torch.empty(1, 3, 299, 299, device="meta"))
    # TF-slim (output_stride None): 75 -> 38 -> 19 -> 10, each drop at the block's last unit.
    n1, n2, n3, n4 = net.units
    assert sizes == [
        [75] * (n1 - 1) + [38],
        [38] * (n2 - 1) + [19],
        [19] * (n3 - 1) + [10],
        [10] * n4,
    ]
    for b, stage in enumerate(net.blocks):
        for u, unit in enumerate(stage):
            last = u == len(stage) - 1
            assert unit.conv2.stride == ((2, 2) if last and b < 3 else (1, 1))
            assert unit.conv1.stride == (1, 1) and isinstance(unit.conv1, nn.Conv2d)
            if u == 0:
                assert isinstance(unit.shortcut, nn.Conv2d)
            elif last and b < 3:
                assert isinstance(unit.shortcut, nn.MaxPool2d) and unit.shortcut.stride == 2


@pytest.mark.slow
def test_resnet_hook_points(nets: dict, images: torch.Tensor) -> None:
    # conv1 receives the pre-activation output; the unit output is shortcut + conv3 output.
    unit = nets["res_v2_50"].blocks[0][2]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        unit.conv1.register_forward_hook(lambda m, i, o: seen.update(conv1_in=i[0])),
        unit.conv3.register_forward_hook(lambda m, i, o: seen.update(conv3_out=o)),
        unit.register_forward_hook(lambda m, i, o: seen.update(unit_in=i[0], unit_out=o)),
    ]
    with torch.no_grad():
        nets["res_v2_50"](images[:1])
    for h in hooks:
        h.remove()
    torch.testing.assert_close(seen["conv1_in"], torch.relu(unit.preact(seen["unit_in"])))
    shortcut = seen["unit_in"][:, :, ::2, ::2]  # 1x1 max pool with stride 2 = subsampling
    torch.testing.assert_close(seen["unit_out"], shortcut + seen["conv3_out"])


# ---------------------------------------------------------------------------------------------
# Files: safetensors conversion and format detection


@pytest.mark.slow
def test_safetensors_round_trip(
    npy_files: dict, logits: dict, images: torch.Tensor, tmp_path: Path
) -> None:
    src = npy_files["inc_v3"]
    dst = tmp_path / "inc_v3.safetensors"
    meta = convert(src, dst)
    assert meta["format"] == "tf2torch" and meta["key"] == "inc_v3"
    assert meta["architecture"] == "inception_v3"
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    back = read_weights(dst)
    orig = read_weights(src)
    assert back.keys() == orig.keys()
    for name, params in orig.items():
        assert back[name].keys() == params.keys()
        for p, a in params.items():
            np.testing.assert_array_equal(back[name][p], a)
    with torch.no_grad():
        out = load_network("inc_v3", dst)(images)
    assert torch.equal(out, logits["inc_v3"])


@pytest.mark.slow  # writes full-size weight files
def test_is_tf2torch_file_reads_content(npy_files: dict, tmp_path: Path) -> None:
    npy = npy_files["res_v2_50"]
    converted = tmp_path / "converted.safetensors"
    convert(npy, converted)
    plain = tmp_path / "model.safetensors"
    save_file(timm.create_model("test_vit.r160_in1k", pretrained=False).state_dict(), str(plain))
    timm_like = tmp_path / "timm_pt.safetensors"
    save_file({"w": torch.zeros(2)}, str(timm_like), metadata={"format": "pt"})
    float_npy = tmp_path / "array.npy"
    np.save(float_npy, np.zeros((2, 3), np.float32))
    assert is_tf2torch_file(npy)
    assert is_tf2torch_file(converted)
    assert not is_tf2torch_file(plain)
    assert not is_tf2torch_file(timm_like)
    assert not is_tf2torch_file(float_npy)
    assert not is_tf2torch_file(tmp_path / "absent.npy")
    # The name does not matter: a converted file named .npy is still found and read.
    renamed = tmp_path / "looks_like.npy"
    renamed.write_bytes(converted.read_bytes())
    assert is_tf2torch_file(renamed)
    assert read_weights(renamed).keys() == read_weights(npy).keys()
    with pytest.raises(UserError, match="neither a tf2torch"):
        read_weights(plain)
    with pytest.raises(UserError, match="plain float32 array"):
        read_weights(float_npy)


def _npy_with_pickle(path: Path, payload: bytes) -> Path:
    """A .npy whose header announces a 0-d object array, followed by `payload`."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "|O", "fortran_order": False, "shape": ()}
        )
        f.write(payload)
    return path


def _py2_pickle(weights: dict[str, dict[str, np.ndarray]]) -> bytes:
    """The pickle a Python-2 numpy wrote for np.save(dict): protocol 2, py2 `str` opcodes
    (SHORT_BINSTRING/BINSTRING), and numpy's reconstructor under `numpy.core.multiarray`."""
    out = bytearray(b"\x80\x02")

    def s(b: bytes) -> None:
        out.extend(
            b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b
        )

    def glob(mod: bytes, name: bytes) -> None:
        out.extend(b"c" + mod + b"\n" + name + b"\n")

    def new_array() -> None:  # _reconstruct(ndarray, (0,), 'b')
        glob(b"numpy.core.multiarray", b"_reconstruct")
        glob(b"numpy", b"ndarray")
        out.extend(b"K\x00\x85")
        s(b"b")
        out.extend(b"\x87R")

    def dtype(code: bytes, endian: bytes, flags: int) -> None:
        glob(b"numpy", b"dtype")
        s(code)
        out.extend(b"K\x00K\x01\x87R(K\x03")
        s(endian)
        out.extend(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK" + bytes([flags]) + b"tb")

    new_array()
    out.extend(b"(K\x01)")  # state: version 1, shape ()
    dtype(b"O8", b"|", 63)
    out.extend(b"\x89]}")  # not Fortran; data list; the layer dict
    for layer, params in weights.items():
        s(layer.encode())
        out.extend(b"}")
        for p, a in params.items():
            s(p.encode())
            new_array()
            out.extend(b"(K\x01(" + b"".join(b"J" + struct.pack("<i", d) for d in a.shape) + b"t")
            dtype(b"f4", b"<", 0)
            out.extend(b"\x89")
            s(a.astype("<f4").tobytes())
            out.extend(b"tbs")  # state tuple, BUILD, SETITEM
        out.extend(b"s")
    out.extend(b"atb.")  # APPEND to the data list, state tuple, BUILD, STOP
    return bytes(out)


def test_python2_era_and_other_pickle_writers(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = {
        "InceptionV3/Logits/Conv2d_1c_1x1/Conv2D": {
            "weights": rng.standard_normal((4, 3, 1, 1), dtype=np.float32),
            "bias": rng.standard_normal(300, dtype=np.float32),
        }
    }  # > 255 bytes: BINSTRING

    def check(got: dict) -> None:
        assert list(got) == list(w)
        for layer, params in w.items():
            assert all(isinstance(k, str) for k in got[layer])
            for p, a in params.items():
                np.testing.assert_array_equal(got[layer][p], a)

    check(read_weights(_npy_with_pickle(tmp_path / "py2.npy", _py2_pickle(w))))
    # Keys as bytes (what a Python-2 file gives when read with encoding='bytes').
    as_bytes = {k.encode(): {p.encode(): a for p, a in v.items()} for k, v in w.items()}
    check(read_weights(write_npy(tmp_path / "bytes_keys.npy", as_bytes)))
    # Protocol 2 (raw bytes through _codecs.encode) and 5 (numpy's _frombuffer) writers.
    for proto in (2, 3, 5):
        payload = pickle.dumps(np.array(w, dtype=object), protocol=proto)
        check(read_weights(_npy_with_pickle(tmp_path / f"p{proto}.npy", payload)))


# ---------------------------------------------------------------------------------------------
# Mismatched files


def _copy(w: dict) -> dict:
    return {k: dict(v) for k, v in w.items()}


def test_missing_layer_is_named(weights: dict) -> None:
    w = _copy(weights["inc_v3"])
    gone = "InceptionV3/InceptionV3/Mixed_6c/Branch_2/Conv2d_0d_7x1/Conv2D"
    del w[gone]
    with pytest.raises(UserError, match=r"1 missing \(" + gone) as e:
        build_network("inc_v3", w)
    assert "unexpected" not in str(e.value) and "mis-shaped" not in str(e.value)


def test_unexpected_layer_and_param_are_named(weights: dict) -> None:
    w = _copy(weights["res_v2_50"])
    w["resnet_v2_50/block5/unit_1/bottleneck_v2/conv1/Conv2D"] = {
        "weights": np.zeros((1, 1, 1, 1), np.float32)
    }
    bn = "resnet_v2_50/postnorm/FusedBatchNorm"
    w[bn]["moving_gamma"] = np.zeros(2048, np.float32)
    with pytest.raises(UserError) as e:
        build_network("res_v2_50", w)
    msg = str(e.value)
    assert "2 unexpected" in msg and "block5/unit_1" in msg and f"{bn}:moving_gamma" in msg
    assert "missing" not in msg


def test_misshaped_layer_is_named(weights: dict) -> None:
    w = _copy(weights["inc_v4"])
    name = "InceptionV4/InceptionV4/Mixed_7b/Branch_2/Conv2d_0c_1x3/Conv2D"
    w[name] = {"weights": np.zeros((512, 448, 3, 1), np.float32)}
    with pytest.raises(UserError, match="1 mis-shaped") as e:
        build_network("inc_v4", w)
    assert f"{name}:weights (file (512, 448, 3, 1), network (512, 448, 1, 3))" in str(e.value)
    with pytest.raises(UserError, match="1 mis-shaped"):
        consumed_report("inc_v4", w)


def test_wrong_key_points_to_the_right_one(weights: dict) -> None:
    with pytest.raises(UserError, match="use that key") as e:
        build_network("inc_v3_ens3", weights["inc_v3"])
    # The network's 189 layers are missing under the ens3 prefix; all 194 of the file are
    # unexpected (aux layers are only skipped under the right prefix).
    msg = str(e.value)
    assert "'inc_v3'" in msg and "189 missing" in msg and "194 unexpected" in msg
    with pytest.raises(UserError, match="Unknown TF-slim model key"):
        build_network("inc_v9", weights["inc_v3"])


# ---------------------------------------------------------------------------------------------
# Malicious pickles


class _Payload:
    def __init__(self, func: object, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


@pytest.mark.parametrize("how", ["os.system", "builtins.exec", "builtins.open"])
def test_malicious_pickle_is_refused_and_never_runs(how: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = {
        "os.system": _Payload(os.system, (f"touch {marker}",)),
        "builtins.exec": _Payload(builtins.exec, (f"open({str(marker)!r}, 'w').write('x')",)),
        "builtins.open": _Payload(builtins.open, (str(marker), "w")),
    }[how]
    evil = {
        "InceptionV3/Logits/Conv2d_1c_1x1/Conv2D": {
            "weights": np.zeros((1, 1, 1, 1), np.float32),
            "bias": payload,
        }
    }
    path = tmp_path / "tf2torch_inception_v3.npy"
    np.save(path, np.array(evil, dtype=object), allow_pickle=True)
    refused = {"os.system": "system", "builtins.exec": "builtins.exec", "builtins.open": "open"}[
        how
    ]
    with pytest.raises(UserError, match="Refusing to load") as e:
        read_weights(path)
    assert refused in str(e.value) and "Nothing it asked for was run" in str(e.value)
    assert not marker.exists()
    with pytest.raises(UserError):
        load_network("inc_v3", path)
    assert not marker.exists()
    if how == "builtins.exec":
        # Control: the payload is real; an ordinary unpickler would have run it.
        with open(path, "rb") as f:
            np.lib.format.read_magic(f)
            np.lib.format.read_array_header_1_0(f)
            pickle.load(f)
        assert marker.exists()
