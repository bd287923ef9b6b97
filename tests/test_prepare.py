"""tgr-bench-prepare on a small synthetic "raw val" folder; launcher presets; make targets."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from tests.conftest import cli
from tgr_bench.data import load_folder
from tgr_bench.prepare import imagenet_synsets
from tgr_bench.prepare import main as prepare

ROOT = Path(__file__).resolve().parents[1]


def raw_val(root: Path, classes: int = 3, per_class: int = 4, first: int = 0) -> Path:
    """ILSVRC-style val folder sorted into synset folders (the classes first, first + 1, ...),
    JPEGs of varied sizes and modes."""
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        folder = root / imagenet_synsets()[first + c]
        folder.mkdir(parents=True)
        for i in range(per_class):
            w, h = 300 + 20 * i, 260 + 30 * c
            arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
            img = Image.fromarray(arr)
            if i == 1:
                img = img.convert("L")  # ImageNet has grayscale and CMYK JPEGs
            img.save(folder / f"ILSVRC2012_val_{c * per_class + i + 1:08d}.JPEG", quality=90)
    return root


def test_build_is_deterministic_and_checks_out(tmp_path: Path, capsys):
    val = raw_val(tmp_path / "val")
    for out in ("a", "b"):
        prepare(["build", "--val", str(val), "--out", str(tmp_path / out), "--seed", "3"])
    a = sorted((tmp_path / "a").iterdir())
    assert [p.name for p in a] == [p.name for p in sorted((tmp_path / "b").iterdir())]
    assert all(p.read_bytes() == (tmp_path / "b" / p.name).read_bytes() for p in a)
    data = load_folder(tmp_path / "a")
    assert len(data) == 3 and data.size == (224, 224)
    assert data.labels.tolist() == [0, 1, 2]
    labels = pd.read_csv(tmp_path / "a" / "labels.csv")
    # One image per class, chosen among that class's files.
    for name, label in zip(labels.filename, labels.label, strict=True):
        number = int(name.split("_")[-1].split(".")[0])
        assert (number - 1) // 4 == label
    prepare(["build", "--val", str(val), "--out", str(tmp_path / "c"), "--seed", "4"])
    other = sorted(pd.read_csv(tmp_path / "c" / "labels.csv").filename)
    assert other != sorted(labels.filename)  # another seed, another draw
    assert "ok" in capsys.readouterr().out


def test_build_refuses_bad_input_and_leaves_no_partial_set(tmp_path: Path, capsys):
    val = raw_val(tmp_path / "val", classes=3, per_class=2)
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = ["filename,label"]
    for i, path in enumerate(sorted(val.rglob("*.JPEG"))):
        (flat / path.name).write_bytes(path.read_bytes())
        rows.append(f"{path.name},{i % 3}")
    (flat / "labels.csv").write_text("\n".join(rows) + "\n")
    last = sorted(flat.glob("*.JPEG"))[-1]
    last.write_bytes(last.read_bytes()[:300])  # truncated: decoded only after others are written

    def fails(*args: str) -> str:
        with pytest.raises(SystemExit) as e:
            prepare(["build", "--val", str(flat), "--labels", str(flat / "labels.csv"), *args])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    assert "--per-class 0: need a whole number of images >= 1" in fails(
        "--out", str(tmp_path / "zero"), "--per-class", "0"
    )
    assert f"Cannot read image {last}" in fails("--out", str(tmp_path / "cut"), "--per-class", "2")
    assert not list((tmp_path / "cut").glob("*.png"))  # the 5 written before it are removed
    (flat / "labels.csv").write_text("filename,label\n" + rows[1].split(",")[0] + ",cat\n")
    assert "Label 'cat' for" in fails("--out", str(tmp_path / "bad"))


def test_build_never_writes_over_or_beside_a_set_and_keeps_every_file(tmp_path: Path, capsys):
    val = raw_val(tmp_path / "val", classes=2, per_class=2)
    out = tmp_path / "set"
    prepare(["build", "--val", str(val), "--out", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as e:
        prepare(["build", "--val", str(raw_val(tmp_path / "other", 3, 1)), "--out", str(out)])
    assert e.value.code == 2
    assert "already holds 3 file(s)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    # Two synset folders that reuse a file name would silently give one file for two images.
    dup = raw_val(tmp_path / "dup", classes=2, per_class=1)
    first, second = sorted(dup.rglob("*.JPEG"))
    second.rename(second.with_name(first.name))
    with pytest.raises(SystemExit):
        prepare(["build", "--val", str(dup), "--out", str(tmp_path / "d")])
    assert "would both be saved as ILSVRC2012_val_00000001.png" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").iterdir())


def test_a_partial_set_keeps_each_synsets_imagenet_index(tmp_path: Path, capsys):
    synsets = imagenet_synsets()
    assert len(synsets) == len(set(synsets)) == 1000 and synsets == sorted(synsets)
    assert (synsets[0], synsets[999]) == ("n01440764", "n15075141")
    val = raw_val(tmp_path / "val", classes=2, per_class=1, first=998)
    prepare(["build", "--val", str(val), "--out", str(tmp_path / "set")])
    assert load_folder(tmp_path / "set").labels.tolist() == [998, 999]  # not 0 and 1
    (val / "cats").mkdir()
    with pytest.raises(SystemExit):
        prepare(["build", "--val", str(val), "--out", str(tmp_path / "x")])
    assert "are not ImageNet-1k synset ids (cats)" in capsys.readouterr().err


def test_resize_and_crop_follow_the_protocol(tmp_path: Path):
    from tgr_bench.prepare import resize_crop

    path = tmp_path / "x.png"
    ramp = torch.arange(512).repeat(256, 1).to(torch.float32).div(2).to(torch.uint8)
    Image.fromarray(ramp.numpy()).convert("RGB").save(path)  # 512x256: short side is 256
    out = resize_crop(path)
    assert out.size == (224, 224)
    # Already at short side 256: the crop is the central 224 columns (offset 144).
    assert abs(int(out.getpixel((0, 0))[0]) - 72) <= 1


def test_check_reports_duplicates_and_wrong_sizes(tmp_path: Path, capsys):
    val = raw_val(tmp_path / "val", classes=2, per_class=2)
    out = tmp_path / "set"
    prepare(["build", "--val", str(val), "--out", str(out)])
    first = sorted(out.glob("*.png"))[0]
    (out / "ILSVRC2012_val_00009999.png").write_bytes(first.read_bytes())
    with open(out / "labels.csv", "a") as f:
        f.write("ILSVRC2012_val_00009999.png,7\n")
    with pytest.raises(SystemExit) as exit_:
        prepare(["check", str(out)])
    assert exit_.value.code == 1
    assert "duplicates" in capsys.readouterr().out


def test_check_accepts_the_authors_layout(json_set: Path, capsys):
    with pytest.raises(SystemExit):  # 64-pixel images: a problem, exit code 1
        prepare(["check", str(json_set.parent)])
    assert "layout json" in capsys.readouterr().out


@pytest.mark.slow
def test_submitit_local_launcher_runs_the_sweep(tmp_path: Path):
    sweep = tmp_path / "sweep"
    r = subprocess.run(
        cli(
            "-m",
            "hydra/launcher=submitit_local",
            "experiment=smoke",
            "data.n=2",
            "attack.steps=1",
            "targets=none",
            "attack=tgr",
            "attack.k=1,2",
            f"hydra.sweep.dir={sweep}",
        ),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert len(list(sweep.glob("*/run.json"))) == 2


def test_launcher_presets_compose(make_cfg):
    from hydra import compose, initialize_config_module

    from tgr_bench.config import register

    register()
    for preset, key in (("slurm", "gpus_per_node"), ("local_parallel", "n_jobs")):
        with initialize_config_module("tgr_bench.conf", version_base="1.3"):
            cfg = compose(
                "config", overrides=[f"hydra/launcher={preset}"], return_hydra_config=True
            )
        assert key in cfg.hydra.launcher


@pytest.mark.slow
def test_make_targets_run_the_documented_commands():
    r = subprocess.run(
        [
            "make",
            "-n",
            "table1",
            "table2",
            "ablation-k",
            "ablation-components",
            "table3",
            "cnn-source",
            "table4",
            "tricks",
            "successors",
            "defenses",
            "DATA=/d",
            "TF2TORCH=/w",
            "STAMP=/dev/null",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "source=vit_base,pit_b,cait_s24,visformer_s attack=mi,vmi,sgm,pna,tgr" in out
    assert "tgr-bench-report multirun/paper --groups vits --out results/table1" in out
    assert "attack.k=1,2,4,8,16" in out and "--sweep k --out results/ablation_k" in out
    assert "'attack.components=[attn],[qkv],[mlp]" in out
    assert "tf2torch_dir=/w" in out and "source=res_v2_101,res_50 attack=mi,sgm,tgr" in out
    assert "tgr-bench-variance source=vit_base 'attacks=[mi,vmi,tgr,tgr_nozero]'" in out
    assert "attack=mi,pna,tgr attack.di.enabled=false,true attack.ti.enabled=false,true" in out
    assert "source=vit_base attack=mi,tgr,att,gns,vdc,fpr,ll2s targets=paper" in out
    assert "targets=transferattack 'defenses=[jpeg,bit_depth,median,rp,pd]'" in out
    help_ = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "GPU+data" in help_ and "table1" in help_ and "ablation-k" in help_


@pytest.mark.parametrize("attack", ["mi", "tgr", "att", "gns", "vdc", "fpr", "ll2s"])
def test_the_successors_and_defenses_targets_resolve_on_vit_base(make_cfg, attack: str):
    from tgr_bench.plan import resolve

    cfg = make_cfg(
        "source=vit_base",
        f"attack={attack}",
        "targets=transferattack",
        "defenses=[jpeg,bit_depth,median,rp,pd]",
        "data.root=/d",
    )
    spec = resolve(cfg, keep=False)
    assert spec.attack.name == attack and len(spec.targets) == 8
    assert [d.label() for d in spec.settings.load_defenses()] == [
        "jpeg",
        "bit_depth",
        "median",
        "rp",
        "pd",
    ]


def _paper_like_archive(path: Path, n: int, size: int = 224) -> None:
    """A zip laid out like the authors' repository archive (top folder, other files beside)."""
    import zipfile

    from tests.conftest import write_images

    folder = path.parent / "repo"
    stems = write_images(folder / "clean_resized_images", n, size=size)
    labels = {f"{s}.JPEG": {"class_id": i, "class_name": f"c{i}"} for i, s in enumerate(stems)}
    with zipfile.ZipFile(path, "w") as z:
        for png in sorted((folder / "clean_resized_images").iterdir()):
            z.write(png, f"TGR-master/clean_resized_images/{png.name}")
        z.writestr("TGR-master/image_name_to_class_id_and_name.json", json.dumps(labels))
        z.writestr("TGR-master/attack.py", "print('not needed')\n")


@pytest.fixture
def http_server(tmp_path: Path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www."""
    import functools
    import http.server
    import threading

    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_fetch_paper_set_downloads_checks_and_says_what_to_pass(http_server, tmp_path, capsys):
    root, base = http_server
    _paper_like_archive(root / "set.zip", 3)
    dest = tmp_path / "tgr1000"
    prepare(["fetch-paper-set", str(dest), "--url", f"{base}/set.zip", "--expect", "3"])
    images = dest / "clean_resized_images"
    assert len(list(images.glob("*.png"))) == 3 and not (dest / "attack.py").exists()
    assert f"data.root={images}" in capsys.readouterr().out
    assert len(load_folder(images)) == 3  # the folder works as data.root
    with pytest.raises(SystemExit) as wrong:
        prepare(["fetch-paper-set", str(dest), "--expect", "1000"])  # already there: checked
    assert wrong.value.code == 2 and "holds 3 PNGs, expected 1000" in capsys.readouterr().err


def test_fetch_paper_set_refuses_a_wrong_set_and_leaves_nothing(http_server, tmp_path, capsys):
    root, base = http_server
    _paper_like_archive(root / "small.zip", 2, size=64)
    dest = tmp_path / "bad"
    with pytest.raises(SystemExit) as e:
        prepare(["fetch-paper-set", str(dest), "--url", f"{base}/small.zip", "--expect", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not 224x224" in err
    assert f"The archive {base}/small.zip is not the expected set" in err and ".fetch-" not in err
    assert not dest.exists()  # a failed check leaves nothing, not even the folder it made
    with pytest.raises(SystemExit) as e:
        prepare(["fetch-paper-set", str(tmp_path / "x"), "--url", f"{base}/missing.zip"])
    assert e.value.code == 2 and "Cannot download" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as e:
        prepare(["fetch-paper-set", str(tmp_path / "y"), "--expect", "-3"])
    assert e.value.code == 2 and "--expect -3: need the number" in capsys.readouterr().err
