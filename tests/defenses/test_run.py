"""Defenses in a run: the `defenses` and `defense.<name>` keys, a target `T+<defense>` per target
in results.csv and predictions.csv, numbers equal to the target applied to the defended pixels
by hand, per-image keys from the run seed, and smoothing's abstentions counted and reported."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.errors import ConfigCompositionException
from rich.progress import Progress

from tests.tiny import tiny_spec
from tgr_bench.advsets import AdvSet
from tgr_bench.crafting import image_seeds
from tgr_bench.data import ImageSet
from tgr_bench.defenses import ABSTAIN, load_defense
from tgr_bench.errors import UserError
from tgr_bench.evaluate import CleanCache, evaluate_sets
from tgr_bench.models import WeightFile, build_model
from tgr_bench.pipeline import run
from tgr_bench.pixels import TensorPixels
from tgr_bench.plan import resolve
from tgr_bench.predict import predict
from tgr_bench.record import AdvSetInfo


def test_the_keys_compose_with_the_papers_defaults_and_take_overrides(make_cfg):
    spec = resolve(make_cfg("experiment=smoke", "defenses=[jpeg,rp]", "defense.jpeg.quality=50"))
    assert spec.settings.defenses == ["jpeg", "rp"]
    built = spec.settings.load_defenses()
    assert built[0].params() == {"jpeg_quality": 50}
    assert built[1].params()["rp_max_scale"] == pytest.approx(331 / 299)
    assert resolve(make_cfg("experiment=smoke")).settings.load_defenses() == []


def test_bad_defense_keys_are_refused_before_anything_runs(make_cfg):
    with pytest.raises(UserError, match="unknown defense 'jpg'; available: jpeg"):
        resolve(make_cfg("experiment=smoke", "defenses=[jpg]"))
    with pytest.raises(UserError, match=r"defense\.jpeg\.quality=0: choose a JPEG quality"):
        resolve(make_cfg("experiment=smoke", "defenses=[jpeg]", "defense.jpeg.quality=0"))
    with pytest.raises(UserError, match=r"defense\.nrp\.weights=<path to NRP\.pth>"):
        resolve(make_cfg("experiment=smoke", "defenses=[nrp]"))
    with pytest.raises(ConfigCompositionException, match="qualty"):  # Hydra's struct check
        make_cfg("experiment=smoke", "defense.jpeg.qualty=50")


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def _setup(n: int = 3):
    spec = tiny_spec("vit")
    model = build_model(spec, WeightFile("random"), "cpu", 7).model  # evaluate_sets: seed 7
    clean, adv = _images(n, 1), _images(n, 2)
    stems = [f"img{i}" for i in range(n)]
    labels = predict(model, TensorPixels(clean), n, torch.device("cpu"))
    labels[0] = (labels[0] + 1) % 1000  # one clean mistake, so clean_acc is not trivially 100
    data = ImageSet(stems, labels, TensorPixels(clean), "mem", "memory", (32, 32))
    data._digest = "test"  # in-memory pixels: no files to hash
    info = AdvSetInfo(run_id="r1", folder="mem", source="src", attack="mi", params={})
    return spec, model, data, AdvSet(info=info, pixels=TensorPixels(adv), aims=None)


def _evaluate(spec, data, adv_set, defenses, batch_size=3):
    with Progress(disable=True) as bars:
        return evaluate_sets(
            targets=[(spec, WeightFile("random"))],
            data=data,
            adv_sets=[adv_set],
            batch_size=batch_size,
            device=torch.device("cpu"),
            seed=7,
            cache=CleanCache(None),
            progress=bars,
            defenses=defenses,
        )


def test_a_defended_column_is_the_target_on_the_defended_pixels():
    spec, model, data, adv_set = _setup()
    defenses = [load_defense("jpeg"), load_defense("rp")]
    rows, loaded, predictions = _evaluate(spec, data, adv_set, defenses)
    assert [r["target"] for r in rows] == ["tiny_vit", "tiny_vit+jpeg", "tiny_vit+rp"]
    keys = image_seeds(data.stems, 7)
    for row, defense in zip(rows[1:], defenses, strict=True):
        with torch.no_grad():
            clean = model(defense(data.pixels.load([0, 1, 2]).float() / 255, keys)).argmax(1)
            adv = model(defense(adv_set.pixels.load([0, 1, 2]).float() / 255, keys)).argmax(1)
        assert row["n_clean_correct"] == int((clean == data.labels).sum())
        assert row["n_fooled"] == int((adv != data.labels).sum())
        assert row["defense"] == defense.name and row["n_abstained"] == 0
        part = predictions[predictions.target == row["target"]]
        assert part.clean_pred.tolist() == clean.tolist()
        assert part.adv_pred.tolist() == adv.tolist()
    assert loaded[1]["defense"] == "jpeg" and "Dziugaite" in loaded[1]["defense_reference"]


def test_randomized_defenses_do_not_depend_on_the_batch():
    spec, _, data, adv_set = _setup()
    defenses = [load_defense("rp"), load_defense("pd", deflections=20)]
    one = _evaluate(spec, data, adv_set, defenses, batch_size=1)[2]
    three = _evaluate(spec, data, adv_set, defenses, batch_size=3)[2]
    pd.testing.assert_frame_equal(one.reset_index(drop=True), three.reset_index(drop=True))


def test_smoothing_abstentions_count_as_wrong_and_are_reported():
    spec, _, data, adv_set = _setup()
    # With n = 8 even a unanimous count has p = 2^-7 > alpha: PREDICT abstains on every image.
    smoothing = load_defense("smoothing", n=8, alpha=0.001, batch=24)
    rows, _, predictions = _evaluate(spec, data, adv_set, [smoothing])
    row = rows[1]
    part = predictions[predictions.target == "tiny_vit+smoothing[n=8]"]
    assert row["n_abstained"] == int((part.adv_pred == ABSTAIN).sum()) == 3
    assert row["n_clean_abstained"] == 3 and row["abstain_rate"] == 100.0
    assert row["n_fooled"] == 3 and row["n_clean_correct"] == 0  # abstaining is never correct


def test_cli_run_writes_a_column_per_target_and_defense(make_cfg, tmp_path: Path):
    cfg = make_cfg("experiment=smoke", "data.n=3", "defenses=[jpeg,bit_depth]")
    run(cfg, output_dir=tmp_path)
    df = pd.read_csv(tmp_path / "results.csv")
    plain = ["test_pit", "test_pit_near", "test_pit_far"]
    assert df.target.tolist() == [f"{t}{d}" for t in plain for d in ("", "+jpeg", "+bit_depth")]
    assert df.defense.fillna("").tolist() == ["", "jpeg", "bit_depth"] * 3
    assert set(pd.read_csv(tmp_path / "predictions.csv").target) == set(df.target)
    assert "through it" in (tmp_path / "results.md").read_text()


def test_nrp_wraps_any_target_from_the_users_file(make_cfg, tmp_path: Path):
    from tests.defenses.test_nrp import saved, small

    net = small()
    path = saved(net, tmp_path)
    spec = resolve(make_cfg("experiment=smoke", "defenses=[nrp]", f"defense.nrp.weights={path}"))
    (nrp,) = spec.settings.load_defenses()
    assert nrp.params()["nrp_weights_sha256"] is not None
    spec_t, model, data, adv_set = _setup()
    rows, _, predictions = _evaluate(spec_t, data, adv_set, [nrp])
    keys = image_seeds(data.stems, 7)
    with torch.no_grad():
        adv = model(nrp(adv_set.pixels.load([0, 1, 2]).float() / 255, keys)).argmax(1)
    part = predictions[predictions.target == "tiny_vit+nrp"]
    assert part.adv_pred.tolist() == adv.tolist() and rows[1]["defense"] == "nrp"


def test_settings_other_than_the_papers_name_their_column_and_unused_ones_are_refused(make_cfg):
    from tgr_bench.evaluate import column_of

    assert column_of("vit_base", load_defense("jpeg")) == "vit_base+jpeg"
    assert column_of("vit_base", load_defense("jpeg", quality=50)) == "vit_base+jpeg[quality=50]"
    with pytest.raises(UserError, match=r"defense.jpeg.quality=50 has no effect: jpeg is not in"):
        resolve(make_cfg("experiment=smoke", "defense.jpeg.quality=50"), keep=False)
    spec = resolve(
        make_cfg("experiment=smoke", "defenses=[jpeg]", "defense.jpeg.quality=50"), keep=False
    )
    assert [d.label() for d in spec.settings.load_defenses()] == ["jpeg[quality=50]"]
