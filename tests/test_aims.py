"""Targeted attacks: the loss sign, where their aims (target labels) come from, the targeted
success rate, the files that carry them, and the report's refusal to mix targeted and
untargeted runs."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.report.fake import LOOP, fake_run, identity, ok
from tests.tiny import batch, tiny
from tgr_bench import metrics
from tgr_bench.aims import random_aims
from tgr_bench.attacks import build_attack
from tgr_bench.data import load_folder
from tgr_bench.errors import UserError
from tgr_bench.pipeline import run
from tgr_bench.record import RunRecord
from tgr_bench.report.cells import collect
from tgr_bench.report.tables import targeted_metric


def test_the_targeted_loss_descends_toward_the_target():
    model = tiny("vit")
    x, y = batch(3)
    target = (y + 7) % 1000
    away = build_attack({"name": "mi"}).input_gradient(
        model, x, torch.zeros_like(x), target, 0, [0, 1, 2]
    )
    toward = build_attack({"name": "mi", "targeted": True}).input_gradient(
        model, x, torch.zeros_like(x), target, 0, [0, 1, 2]
    )
    assert torch.equal(toward, -away)
    adv = build_attack({"name": "mi", "targeted": True, "steps": 5}).perturb(
        model, x, target, [0, 1, 2]
    )
    with torch.no_grad():
        before = model(x).log_softmax(1).gather(1, target[:, None])
        after = model(adv).log_softmax(1).gather(1, target[:, None])
    assert (after > before).all()  # the target class became more likely for every image


def test_the_targeted_success_rate_on_hand_made_predictions():
    labels = torch.tensor([1, 2, 3, 4])
    clean = torch.tensor([1, 2, 3, 0])
    adv = torch.tensor([9, 2, 7, 8])
    aims = torch.tensor([9, 5, 7, 6])
    c = metrics.counts(labels, clean, adv, aims)
    assert (c["n_target_hit"], c["n_fooled"]) == (2, 3)
    r = metrics.rates(c)
    assert (r["tsr"], r["asr"]) == (50.0, 75.0)
    assert metrics.rates(metrics.counts(labels, clean, adv))["tsr"] != metrics.rates(c)["tsr"]


def test_random_aims_are_other_classes_and_seeded():
    labels = torch.arange(0, 1000, 7)
    seeds = list(range(len(labels)))
    t = random_aims(labels, seeds)
    assert (t != labels).all() and t.min() >= 0 and t.max() < 1000
    assert torch.equal(t, random_aims(labels, seeds))
    assert not torch.equal(t, random_aims(labels, [s + 1 for s in seeds]))


def with_targets(csv_set: Path, cells: list[str] | None = None) -> Path:
    """labels.csv with a `target` column: `cells`, or 500, 501, ... by default."""
    path = csv_set / "labels.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cells = cells or [str(500 + i) for i in range(len(rows))]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label", "target"])
        for row, target in zip(rows, cells, strict=True):
            w.writerow([row["filename"], row["label"], target])
    return csv_set


@pytest.mark.parametrize("mode", ["auto", "labels", "least_likely", "random"])
def test_targeted_runs_record_their_targets(make_cfg, tmp_path: Path, csv_set: Path, mode: str):
    with_targets(csv_set)
    out = tmp_path / mode
    record = run(
        make_cfg(
            "experiment=smoke", "data=folder", f"data.root={csv_set}", "attack.steps=2",
            "attack.targeted=true", f"attack.target={mode}", "data.limit=4",
        ),
        output_dir=out,
    )  # fmt: skip
    assert record.identity.params["targeted"] is True and record.identity.params["target"] == mode
    written = pd.read_csv(out / "targets.csv")
    preds = pd.read_csv(out / "predictions.csv")
    assert set(preds.target_label) == set(written.target_label)
    if mode in ("auto", "labels"):  # the labels.csv column
        assert written.target_label.tolist() == [500, 501, 502, 503]
    else:
        assert (written.target_label != pd.read_csv(csv_set / "labels.csv").label[:4]).any()
    results = pd.read_csv(out / "results.csv")
    assert results.tsr.notna().all() and results.n_target_hit.notna().all()


def test_labels_mode_needs_the_column(make_cfg, tmp_path: Path, csv_set: Path):
    cfg = make_cfg(
        "experiment=smoke", "data=folder", f"data.root={csv_set}", "attack.targeted=true",
        "attack.target=labels", "targets=none",
    )  # fmt: skip
    with pytest.raises(UserError, match="no target column|has none"):
        run(cfg, output_dir=tmp_path)


def test_a_targeted_folder_brings_its_targets_to_an_evaluation(make_cfg, tmp_path: Path):
    common = ("experiment=smoke", "data.n=3", "attack.steps=1")
    run(make_cfg(*common, "attack.targeted=true", "targets=none"), output_dir=tmp_path / "a")
    evaluated = run(
        make_cfg(*common, f"adv_dir={tmp_path / 'a' / 'images'}"), output_dir=tmp_path / "e"
    )
    assert evaluated.sets[0].params["targeted"] is True
    preds = pd.read_csv(tmp_path / "e" / "predictions.csv")
    assert (
        preds.target_label.tolist()[:3]
        == pd.read_csv(tmp_path / "a" / "targets.csv").target_label.tolist()
    )
    assert RunRecord.load(tmp_path / "e").complete


def test_the_report_uses_tsr_for_targeted_tables_and_never_mixes(tmp_path: Path):
    targeted = identity("vit_base", "mi", {"targeted": True, "target": "random"})
    fake_run(tmp_path / "t", "a", targeted, [ok("pit_b", 4)])
    metric, title = targeted_metric(collect([tmp_path / "t"]), "asr")
    assert metric == "tsr" and "targeted" in title
    fake_run(tmp_path / "t", "b", identity("vit_base", "mi", LOOP), [ok("pit_b", 4)])
    with pytest.raises(UserError, match="Targeted and untargeted runs cannot share a table"):
        targeted_metric(collect([tmp_path / "t"]), "asr")


def test_untargeted_runs_neither_read_nor_hash_the_target_column(csv_set: Path):
    """A `target` column with a blank and a bad cell: an untargeted run's data (and its digest,
    which decides resumes) is as without the column; a targeted run that reads it is told which
    cell is wrong."""
    plain = load_folder(csv_set).digest
    data = load_folder(with_targets(csv_set, ["", "cat", "3", "4", "5"]))
    assert data.digest == plain and data.aims is None
    with pytest.raises(UserError, match="for the target of ILSVRC2012_val_00000001"):
        data.column_aims()
    assert load_folder(csv_set, limit=5).subset([2, 4], None).column_aims().tolist() == [3, 5]
