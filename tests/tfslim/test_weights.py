"""The paper's TF-slim weights as tgr-bench uses them: which file a key loads, 1001 classes with
the background logit, the CLI evaluating a folder with tf2torch_dir=, the one-time conversion
and the Python API."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

from tgr_bench import load_model, metrics
from tgr_bench.attacks import build_attack
from tgr_bench.catalogue import model_keys, model_spec
from tgr_bench.errors import UserError
from tgr_bench.evaluate import predict
from tgr_bench.models import PixelModel, build_model, resolve_weights
from tgr_bench.pixels import TensorPixels
from tgr_bench.prepare import main as prepare
from tgr_bench.tfslim import FILES, is_tf2torch_file, read_weights


@pytest.fixture
def tf2torch_dir(tmp_path: Path, npy_files: dict[str, Path]) -> Path:
    """A folder as researchers have it: released names for some keys, a public name for one."""
    folder = tmp_path / "tf2torch"
    folder.mkdir()
    for key in ("inc_v3", "res_v2_50"):
        os.symlink(npy_files[key], folder / FILES[key].released_name)
    # The ensemble-trained Inception-v3 has Inception-v3's layout: one file serves both keys.
    os.symlink(npy_files["inc_v3"], folder / FILES["inc_v3_ens3"].public_name)
    return folder


def test_the_five_tfslim_only_keys_say_where_their_files_are():
    for key in ("res_v2_50", "res_v2_101", "res_v2_152", "inc_v3_ens3", "inc_v3_ens4"):
        spec = model_spec(key)
        assert spec.model is None and spec.tfslim == key
        with pytest.raises(UserError, match=f"{FILES[key].released_name}.*tf2torch_dir="):
            resolve_weights(spec)


@pytest.mark.slow  # writes full-size weight files
def test_tf2torch_dir_finds_either_file_name_and_prefers_safetensors(tf2torch_dir: Path):
    w = resolve_weights(model_spec("inc_v3"), str(tf2torch_dir))
    assert (w.kind, Path(w.path).name) == ("tf2torch", "tf2torch_inception_v3.npy")
    assert Path(resolve_weights(model_spec("inc_v3_ens3"), str(tf2torch_dir)).path).name == (
        "tf_ens3_adv_inc_v3.npy"
    )
    prepare(["convert-tf2torch", str(tf2torch_dir), str(tf2torch_dir)])
    converted = resolve_weights(model_spec("inc_v3"), str(tf2torch_dir))
    assert Path(converted.path).name == "tf2torch_inception_v3.safetensors"
    assert is_tf2torch_file(converted.path)
    with pytest.raises(UserError, match="tf2torch_inception_resnet_v2|tf2torch_inc_res_v2"):
        resolve_weights(model_spec("incres_v2"), str(tf2torch_dir))  # not in the folder


def test_a_models_own_checkpoint_wins_and_its_format_is_read_from_content(
    tf2torch_dir: Path, npy_files: dict[str, Path], tmp_path: Path
):
    spec = replace(model_spec("inc_v3"), checkpoint=str(npy_files["inc_v3"]))
    assert resolve_weights(spec, str(tmp_path)).kind == "tf2torch"  # tf2torch_dir not consulted
    torch.manual_seed(0)
    timm_net = timm.create_model("inception_v3", pretrained=False)
    plain = tmp_path / "timm_inception_v3.safetensors"
    save_file(timm_net.state_dict(), str(plain))
    timm_spec = replace(model_spec("inc_v3"), checkpoint=str(plain))
    assert resolve_weights(timm_spec, str(tf2torch_dir)).kind == "checkpoint"  # a timm state dict
    with pytest.raises(UserError, match="not a converted TF-slim weight file"):
        resolve_weights(replace(model_spec("res_v2_101"), checkpoint=str(plain)))
    with pytest.raises(UserError, match="holds converted TF-slim weights, but 'vit_base'"):
        resolve_weights(replace(model_spec("vit_base"), checkpoint=str(npy_files["inc_v3"])))


def test_tfslim_weights_keep_1001_classes_and_their_own_preprocessing(
    npy_files: dict[str, Path],
):
    spec = replace(model_spec("res_v2_50"), checkpoint=str(npy_files["res_v2_50"]))
    loaded = build_model(spec, resolve_weights(spec), "cpu")
    model = loaded.model
    assert (model.label_offset, model.input_size) == (1, 299)
    assert model.mean.flatten().tolist() == [0.5] * 3 and model.std.flatten().tolist() == [0.5] * 3
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 1001)
        # The PixelModel wrapper is exactly x*2-1 at 299 (bilinear) into the TF-slim network.
        direct = model.net(
            torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear") * 2 - 1
        )
    assert torch.allclose(logits, direct, atol=1e-5)
    assert loaded.provenance()["tfslim"] == "res_v2_50"
    assert loaded.provenance()["sha256"] and loaded.provenance()["label_offset"] == 1


class Fixed(torch.nn.Module):
    """1001 logits, the maximum at index[i] for the image whose pixels are all i."""

    def __init__(self, index: list[int]) -> None:
        super().__init__()
        self.index = torch.tensor(index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = ((x[:, 0, 0, 0] * 0.5 + 0.5) * 255).round().long()  # undo the [-1, 1] scaling
        out = torch.zeros(len(x), 1001)
        out[torch.arange(len(x)), self.index[i]] = 5.0
        return out


def test_a_background_prediction_is_a_wrong_answer():
    model = PixelModel(Fixed([0, 4, 8]), (0.5,) * 3, (0.5,) * 3, 8, label_offset=1)
    images = torch.arange(3, dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 8, 8)
    preds = predict(model, TensorPixels(images), 2, "cpu")  # two batches
    assert preds.tolist() == [-1, 3, 7]  # logit 0 is background: class -1
    labels = torch.tensor([0, 3, 7])
    c = metrics.counts(labels, preds, preds)
    assert (c["n_fooled"], c["n_clean_correct"]) == (1, 2)  # the background one counts as fooled


def test_the_attack_takes_its_loss_at_logit_y_plus_one():
    """MI on a 1001-class source with label y equals MI on the same net told the label y+1."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 1001))
    with_offset = PixelModel(net, (0.5,) * 3, (0.5,) * 3, 8, label_offset=1).requires_grad_(False)
    plain = PixelModel(net, (0.5,) * 3, (0.5,) * 3, 8, label_offset=0).requires_grad_(False)
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([3, 999])
    attack = build_attack({"name": "mi", "steps": 3})
    offset = attack.perturb(with_offset, x, y, [0, 1])
    assert torch.equal(offset, attack.perturb(plain, x, y + 1, [0, 1]))
    assert not torch.equal(offset, attack.perturb(plain, x, y, [0, 1]))


@pytest.mark.slow  # writes full-size weight files
def test_cli_evaluates_a_folder_on_tf2torch_weights(tgr, tmp_path: Path, tf2torch_dir: Path):
    crafted = tmp_path / "crafted"
    common = ["experiment=smoke", "data.n=2", "attack.steps=1", "data.labels=random"]
    r = tgr(*common, "targets=none", f"hydra.run.dir={crafted}")
    assert r.returncode == 0, r.stderr
    evaluation = tmp_path / "eval"
    r = tgr(
        *common,
        "targets=none",
        "+targets.res_v2_50.key=res_v2_50",
        "+targets.res_v2_50.tfslim=res_v2_50",
        f"tf2torch_dir={tf2torch_dir}",
        f"adv_dir={crafted / 'images'}",
        f"hydra.run.dir={evaluation}",
    )
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(evaluation / "results.csv")
    row = df.iloc[0]
    assert (row.target, row.target_weights, row.status, row.n) == ("res_v2_50", "tf2torch", "ok", 2)
    expected = hashlib.sha256(
        (tf2torch_dir / FILES["res_v2_50"].released_name).read_bytes()
    ).hexdigest()
    assert row.target_sha256 == expected


@pytest.mark.slow  # writes full-size weight files
def test_load_model_api(npy_files: dict[str, Path]):
    model = load_model("test_vit")
    assert not model.training and model.label_offset == 0
    for shape in ((1, 3, 224, 224), (2, 3, 100, 120)):
        with torch.no_grad():
            assert model(torch.rand(*shape)).shape == (shape[0], 1000)
    tf = load_model("res_v2_50", checkpoint=str(npy_files["res_v2_50"]))
    assert tf.label_offset == 1
    with torch.no_grad():
        assert tf(torch.rand(1, 3, 224, 224)).shape == (1, 1001)
    with pytest.raises(UserError, match="Unknown model key 'resnet_9000'.*vit_base"):
        load_model("resnet_9000")
    assert "res_v2_101" in model_keys() and "schema" not in model_keys()


@pytest.mark.slow  # writes full-size weight files
def test_converted_file_gives_the_same_logits(npy_files: dict[str, Path], tmp_path: Path):
    shutil.copy(npy_files["res_v2_50"], tmp_path / FILES["res_v2_50"].released_name)
    prepare(["convert-tf2torch", str(tmp_path), str(tmp_path / "safe")])
    converted = tmp_path / "safe" / "tf2torch_resnet_v2_50.safetensors"
    assert set(read_weights(converted)) == set(read_weights(npy_files["res_v2_50"]))
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        a = load_model("res_v2_50", checkpoint=str(npy_files["res_v2_50"]))(x)
        b = load_model("res_v2_50", checkpoint=str(converted))(x)
    assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["mi", "vmi", "pna_patchout"])
def test_attacks_without_sites_run_from_a_tfslim_source(
    attack: str, make_cfg, tmp_path: Path, npy_files: dict[str, Path]
):
    from tgr_bench.pipeline import run

    overrides = ["attack.n_samples=2"] if attack == "vmi" else []
    if attack == "pna_patchout":  # PNA needs attention; PatchOut alone is a modifier of MI
        attack, overrides = "mi", ["attack.patchout.enabled=true"]
    cfg = make_cfg(
        "experiment=smoke", "source=inc_v3", f"source.checkpoint={npy_files['inc_v3']}",
        f"attack={attack}", "attack.steps=1", "data.n=2", "data.labels=random",
        "targets=none", *overrides,
    )  # fmt: skip
    record = run(cfg, output_dir=tmp_path)
    assert record.source["weights"] == "tf2torch" and record.source["label_offset"] == 1
    assert record.crafting.attacked == 2 and record.crafting.linf_levels_max <= 16
