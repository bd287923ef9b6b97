"""run(cfg) end to end on tiny real timm models: files, eps, metrics, provenance, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from omegaconf import OmegaConf

from tests.conftest import write_images
from tgr_bench.data import read_image, synthetic
from tgr_bench.errors import UserError
from tgr_bench.pipeline import run
from tgr_bench.record import RunRecord

SMOKE_TARGETS = ["test_vit", "test_convnext", "test_efficientnet"]
# The smoke experiment with a tiny ViT source and, as targets, itself and two tiny CNNs.
TINY_VIT_AND_CNNS = (
    "source=test_vit",
    "attack.eps=16",
    "targets=none",
    *(f"+source@targets.{key}={key}" for key in SMOKE_TARGETS),
)


def target_checkpoints(tmp_path: Path) -> tuple[list[str], dict[str, torch.nn.Module]]:
    """Fixed weights for the CNN targets, so the test can recompute their predictions; the ViT
    target keeps the source's (seeded random) weights: it is the white-box cell."""
    overrides, nets = list(TINY_VIT_AND_CNNS), {}
    for i, key in enumerate(SMOKE_TARGETS[1:]):
        torch.manual_seed(100 + i)
        net = timm.create_model(f"{key}.r160_in1k", pretrained=False).eval()
        path = tmp_path / f"{key}.pth"
        torch.save(net.state_dict(), path)
        overrides.append(f"targets.{key}.checkpoint={path}")
        nets[key] = net
    return overrides, nets


def predict_independently(net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    cfg = net.pretrained_cfg
    x = images.float() / 255
    x = torch.nn.functional.interpolate(
        x, size=cfg["input_size"][1:], mode="bilinear", align_corners=False
    )
    mean, std = (torch.tensor(cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        return net((x - mean) / std).argmax(1)


def test_smoke_experiment_end_to_end(make_cfg, tmp_path: Path):
    overrides, nets = target_checkpoints(tmp_path)
    out = tmp_path / "run"
    record = run(make_cfg("experiment=smoke", "data.n=8", *overrides), output_dir=out)

    clean = synthetic(8)
    pngs = sorted((out / "images").glob("*.png"))
    assert [p.stem for p in pngs] == clean.stems
    adv = torch.stack([read_image(p) for p in pngs])
    diff = (adv.int() - clean.load().int()).abs()
    assert diff.max() <= 16 and diff.float().mean() > 4  # within eps, and really perturbed

    df = pd.read_csv(out / "results.csv")
    assert df.target.tolist() == SMOKE_TARGETS
    assert set(df.source) == {"test_vit"} and set(df.attack) == {"mi"}
    assert set(df.params) == {"alpha=1.6 decay=1.0 eps=16.0 steps=10"}
    assert df.white_box.tolist() == [True, False, False]
    white = df[df.white_box].iloc[0]
    # Smoke labels are the source's clean predictions, and the white-box target is the source.
    assert (white.clean_acc, white.asr, white.asr_on_correct) == (100.0, 100.0, 100.0)
    for row in df[~df.white_box].itertuples():
        clean_pred = predict_independently(nets[row.target], clean.load())
        adv_pred = predict_independently(nets[row.target], adv)
        assert row.n == 8
        assert row.asr == pytest.approx(100 * (adv_pred != clean.labels).float().mean().item())
        assert row.clean_acc == pytest.approx(
            100 * (clean_pred == clean.labels).float().mean().item()
        )
    assert (out / "results.md").read_text().count("\n| test_vit | mi | alpha=1.6") == 3
    assert set(df.run_id) == {record.identity.run_id}
    assert df.target_weights.tolist() == ["random", "checkpoint", "checkpoint"]

    saved = json.loads((out / "run.json").read_text())
    assert saved == json.loads(json.dumps(record.to_dict(), default=str))
    assert RunRecord.load(out) == record
    assert saved["status"] == "complete" and saved["data"]["n_images"] == 8
    assert saved["identity"]["params"] == {"eps": 16.0, "steps": 10, "alpha": 1.6, "decay": 1.0}
    assert saved["attack"]["label"] == "mi" and saved["attack"]["defaults"]["steps"] == 10
    modifiers = ("patchout", "di", "ti", "si", "admix")
    assert {k: v for k, v in saved["config"]["attack"].items() if k not in modifiers} == {
        "name": "mi",
        "eps": 16,
        "steps": 10,
        "alpha": None,
        "decay": 1.0,
        "targeted": False,
        "target": "auto",
    }
    assert all(saved["config"]["attack"][m]["enabled"] is False for m in modifiers)
    assert {"python", "torch", "timm", "tgr_bench"} <= set(saved["versions"])
    assert (
        saved["source"]["model"] == "test_vit.r160_in1k" and saved["source"]["weights"] == "random"
    )
    assert [t["weights"] for t in saved["targets"]] == ["random", "checkpoint", "checkpoint"]
    assert all(len(t["sha256"]) == 64 for t in saved["targets"][1:])
    assert saved["crafting"]["linf_levels_max"] <= 16
    assert saved["started"] <= saved["finished"]


def test_evaluating_an_existing_folder_gives_the_same_numbers(make_cfg, tmp_path: Path):
    overrides, _ = target_checkpoints(tmp_path)
    run(
        make_cfg("experiment=smoke", "data.n=4", "data.labels=random", *overrides),
        output_dir=tmp_path / "a",
    )
    record = run(
        make_cfg(
            "experiment=smoke",
            "data.n=4",
            "data.labels=random",
            f"adv_dir={tmp_path / 'a' / 'images'}",
            *overrides,
        ),
        output_dir=tmp_path / "b",
    )
    a = pd.read_csv(tmp_path / "a" / "results.csv")
    b = pd.read_csv(tmp_path / "b" / "results.csv")
    assert a.target.tolist() == b.target.tolist()
    assert a.asr.tolist() == b.asr.tolist() and a.clean_acc.tolist() == b.clean_acc.tolist()
    # A tgr-bench run's images keep their source and attack; other folders are "external".
    assert set(b.source) == {"test_vit"} and set(b.attack) == {"mi"}
    assert record.sets[0].folder.endswith("images") and record.sets[0].identity is not None
    assert not (tmp_path / "b" / "images").exists()


def test_a_source_labelled_run_is_evaluated_against_the_labels_it_attacked(
    make_cfg, tmp_path: Path
):
    # Smoke sets are labelled by the source's clean predictions; an adv_dir evaluation has no
    # source, so it reads the crafting run's labels.csv and reproduces its numbers.
    run(make_cfg("experiment=smoke", "data.n=4"), output_dir=tmp_path / "a")
    labels = pd.read_csv(tmp_path / "a" / "labels.csv")
    predictions = pd.read_csv(tmp_path / "a" / "predictions.csv")
    white_box = predictions[predictions.target == "test_pit"].set_index("stem")
    assert labels.set_index("stem").label.to_dict() == white_box.clean_pred.to_dict()
    evaluation = make_cfg("experiment=smoke", "data.n=4", f"adv_dir={tmp_path / 'a' / 'images'}")
    run(evaluation, output_dir=tmp_path / "b")
    a = pd.read_csv(tmp_path / "a" / "results.csv")
    b = pd.read_csv(tmp_path / "b" / "results.csv")
    assert a.asr.tolist() == b.asr.tolist() and a.clean_acc.tolist() == b.clean_acc.tolist()
    assert set(a.clean_acc) != {0.0}
    (tmp_path / "a" / "labels.csv").unlink()
    with pytest.raises(UserError, match="holds no labels.csv"):
        run(evaluation, output_dir=tmp_path / "c")


def test_many_folders_one_invocation_each_target_loaded_once(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    common = ("experiment=smoke", "data.n=3", "data.labels=random", "attack.steps=2")
    craft_only = ("source=test_vit", "attack.eps=16", "targets=none")
    run(make_cfg(*common, *craft_only), output_dir=tmp_path / "mi")
    run(make_cfg(*common, *craft_only, "attack=tgr"), output_dir=tmp_path / "tgr")
    other = tmp_path / "other_tool"
    other.mkdir()
    for p in (tmp_path / "mi" / "images").iterdir():
        (other / p.name).write_bytes(p.read_bytes())
    from tgr_bench import evaluate

    built, predicted = [], []
    real_build, real_predict = evaluate.build_model, evaluate.predict
    monkeypatch.setattr(
        evaluate, "build_model", lambda spec, *a: built.append(spec.key) or real_build(spec, *a)
    )
    monkeypatch.setattr(
        evaluate, "predict", lambda *a, **k: predicted.append(1) or real_predict(*a, **k)
    )
    folders = f"[{tmp_path / 'mi' / 'images'},{tmp_path / 'tgr' / 'images'},{other}]"
    run(
        make_cfg(*common, *TINY_VIT_AND_CNNS, f"adv_dir={folders}", "cache_dir=null"),
        output_dir=tmp_path / "eval",
    )
    assert built == SMOKE_TARGETS  # each target loaded once for all three folders
    assert len(predicted) == 3 * (1 + 3)  # per target: clean once, then each folder
    df = pd.read_csv(tmp_path / "eval" / "results.csv")
    assert sorted(set(zip(df.source, df.attack, strict=True))) == [
        ("external", "other_tool"),
        ("test_vit", "mi"),
        ("test_vit", "tgr"),
    ]
    mi, ext = df[df.attack == "mi"], df[df.attack == "other_tool"]
    assert mi.asr.tolist() == ext.asr.tolist()  # same images, same numbers


def test_clean_predictions_are_cached_across_runs(make_cfg, tmp_path: Path, monkeypatch):
    from tgr_bench import evaluate

    calls = []
    real = evaluate.predict
    monkeypatch.setattr(evaluate, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = tmp_path / "cache"
    common = ("experiment=smoke", "data.n=2", "attack.steps=1", f"cache_dir={cache}")
    run(make_cfg(*common), output_dir=tmp_path / "a")
    first = len(calls)
    assert first == 2 * 3 and len(list((cache / "clean").iterdir())) == 3
    rec = run(make_cfg(*common, "attack=tgr"), output_dir=tmp_path / "b")
    assert len(calls) - first == 3  # adversarial only: clean predictions came from the cache
    a = pd.read_csv(tmp_path / "a" / "results.csv")
    b = pd.read_csv(tmp_path / "b" / "results.csv")
    assert a.clean_acc.tolist() == b.clean_acc.tolist()
    assert all(t["clean_cache_key"] for t in rec.targets)


def test_rerunning_a_finished_run_is_a_no_op(make_cfg, tmp_path: Path):
    cfg = make_cfg("experiment=smoke", "data.n=2", "attack.steps=1")
    first = run(cfg, output_dir=tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert run(cfg, output_dir=tmp_path) == first
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}


def test_both_folder_layouts_run(make_cfg, tmp_path: Path, csv_set: Path, json_set: Path):
    for name, root in (("csv", csv_set), ("json", json_set)):
        out = tmp_path / name
        run(
            make_cfg(
                "experiment=smoke",
                "data=folder",
                f"data.root={root}",
                "attack.steps=2",
                "targets=none",
            ),
            output_dir=out,
        )
        assert sorted(p.stem for p in (out / "images").iterdir()) == [
            f"ILSVRC2012_val_{i:08d}" for i in range(1, 6)
        ]
        assert RunRecord.load(out).data.layout == name
        assert not (out / "results.csv").exists()  # targets=none: craft and save only


def test_crafting_does_not_depend_on_batch_size(make_cfg, tmp_path: Path):
    for bs in (1, 3):
        run(
            make_cfg("experiment=smoke", "data.n=5", "targets=none", f"batch_size={bs}"),
            output_dir=tmp_path / f"bs{bs}",
        )
    for p in sorted((tmp_path / "bs1" / "images").iterdir()):
        assert p.read_bytes() == (tmp_path / "bs3" / "images" / p.name).read_bytes()


def test_target_without_required_checkpoint_is_missing_not_zero(make_cfg, tmp_path: Path):
    cfg = make_cfg("experiment=smoke", "data.n=2", "attack.steps=1")
    OmegaConf.set_struct(cfg, False)
    cfg.targets.inc_v3_ens3 = {"key": "inc_v3_ens3", "tfslim": "inc_v3_ens3"}
    run(cfg, output_dir=tmp_path)
    df = pd.read_csv(tmp_path / "results.csv")
    row = df[df.target == "inc_v3_ens3"].iloc[0]
    assert row.status == "missing checkpoint" and pd.isna(row.asr)
    assert (df[df.target != "inc_v3_ens3"].status == "ok").all()


def _corrupt(root: Path) -> None:
    p = root / "ILSVRC2012_val_00000002.png"
    p.write_bytes(p.read_bytes()[:100])


@pytest.mark.parametrize(
    "overrides,prepare,match",
    [
        (["data=folder", "data.root=/no/such/folder"], None, "does not exist"),
        (["data=folder"], None, "data.root is not set"),
        (["data=folder", "data.root={csv}"], _corrupt, "ILSVRC2012_val_00000002.png"),
        (["source.model=no_such_arch"], None, "Unknown timm architecture"),
        (["attack.eps=0"], None, "outside"),
        (["attack.eps=255.5"], None, "outside"),
        (["attack.steps=0"], None, "steps"),
        (["batch_size=0"], None, "batch_size"),
        (["device=cuda:7"], None, "device"),
        (["source.checkpoint=/no/such.pth"], None, "not found"),
    ],
)
def test_bad_input_fails_before_any_work(
    make_cfg, tmp_path: Path, csv_set: Path, overrides, prepare, match
):
    if prepare:
        prepare(csv_set)
    cfg = make_cfg("experiment=smoke", *(o.format(csv=csv_set) for o in overrides))
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match):
        run(cfg, output_dir=out)
    assert not out.exists()  # nothing written, nothing that looks like a result


def test_skipped_unlabeled_images_are_counted_in_the_record(make_cfg, tmp_path: Path, csv_set):
    write_images(tmp_path / "more", 7)
    (tmp_path / "more" / "ILSVRC2012_val_00000007.png").rename(csv_set / "unlisted.png")
    common = ("experiment=smoke", "data=folder", f"data.root={csv_set}", "attack.steps=1")
    with pytest.raises(UserError, match="1 images .* have no label"):
        run(make_cfg(*common, "targets=none"), output_dir=tmp_path / "refused")
    record = run(
        make_cfg(*common, "targets=none", "data.allow_unlabeled=true"), output_dir=tmp_path / "ok"
    )
    assert record.data.unlabeled_skipped == 1 and record.data.n_images == 5
    assert RunRecord.load(tmp_path / "ok").data.unlabeled_skipped == 1


def _peak_rss_mb(n: int, tmp_path: Path) -> float:
    """Peak resident memory of a whole run on n synthetic 224x224 images, in a fresh process."""
    code = (
        "import resource, sys\n"
        "from tgr_bench.config import compose\n"
        "from tgr_bench.pipeline import run\n"
        "cfg = compose(['experiment=smoke', 'data.n=' + sys.argv[1],\n"
        "    'data.labels=random', 'attack.steps=1', 'batch_size=16', 'cache_dir=null'])\n"
        "run(cfg, output_dir=sys.argv[2])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    args = [sys.executable, "-c", code, str(n), str(tmp_path / f"n{n}")]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split()[-1]) / 1024


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path: Path):
    """Pixels live only for the batches in flight: three times the images, about the same peak
    (the run before streaming grew by about 2 MB per image, 800 MB here). Both sizes are past
    the first batches, where thread pools and the allocator settle."""
    small, large = _peak_rss_mb(200, tmp_path), _peak_rss_mb(600, tmp_path)
    assert large - small < 100, (small, large)


def test_other_target_weights_add_rows_and_never_overwrite(make_cfg, tmp_path: Path):
    overrides, _ = target_checkpoints(tmp_path)
    common = ("experiment=smoke", "data.n=2", "attack.steps=1", "data.labels=random")
    run(make_cfg(*common, *overrides), output_dir=tmp_path / "run")
    first = pd.read_csv(tmp_path / "run" / "results.csv")
    torch.manual_seed(7)  # other weights for test_convnext
    net = timm.create_model("test_convnext.r160_in1k", pretrained=False)
    other = tmp_path / "convnext_other.pth"
    torch.save(net.state_dict(), other)
    swapped = [o for o in overrides if not o.startswith("targets.test_convnext.checkpoint=")]
    run(
        make_cfg(*common, *swapped, f"targets.test_convnext.checkpoint={other}"),
        output_dir=tmp_path / "run",
    )
    second = pd.read_csv(tmp_path / "run" / "results.csv")
    convnext = second[second.target == "test_convnext"]
    assert len(convnext) == 2 and convnext.target_sha256.nunique() == 2  # both weight files
    kept = first[first.target == "test_convnext"].iloc[0]
    assert kept.target_sha256 in set(convnext.target_sha256)
    assert (second.target == "test_vit").sum() == 1  # the same weights: replaced, not doubled


def test_admix_shards_and_limits_equal_the_whole_run(make_cfg, tmp_path: Path):
    """Admix draws partners from the whole data set as listed before data.limit and sharding:
    each shard (and a limited run) saves exactly the images of the unsharded run."""
    common = (
        "experiment=smoke", "data.n=6", "attack.steps=2", "targets=none",
        "attack.admix.enabled=true", "attack.admix.m1=2", "attack.admix.m2=2",
    )  # fmt: skip
    run(make_cfg(*common), output_dir=tmp_path / "whole")
    for shard in (0, 1):
        run(
            make_cfg(*common, "data.num_shards=2", f"data.shard={shard}"),
            output_dir=tmp_path / f"s{shard}",
        )
    run(make_cfg(*common, "data.limit=3"), output_dir=tmp_path / "limited")
    whole = {p.name: p.read_bytes() for p in (tmp_path / "whole" / "images").iterdir()}
    parts = {}
    for shard in (0, 1):
        parts |= {p.name: p.read_bytes() for p in (tmp_path / f"s{shard}" / "images").iterdir()}
    assert parts == whole
    for p in (tmp_path / "limited" / "images").iterdir():
        assert p.read_bytes() == whole[p.name]
