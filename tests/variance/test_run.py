"""The gradient-variance analysis (tgr-bench-variance, docs/tgr.md section 9): the statistic
against hand computations, blindness to uniform scaling, the blocks of every family, read-only
recording, the written tables and plot, and the console script."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch

from tests.tiny import batch, make, tiny
from tgr_bench.attacks import MIFGSM
from tgr_bench.catalogue import model_spec
from tgr_bench.config import choices, compose
from tgr_bench.errors import UserError
from tgr_bench.images import quantize
from tgr_bench.models import WeightFile, build_model
from tgr_bench.tfslim.registry import create_network
from tgr_bench.variance.blocks import BLOCKS, source_blocks
from tgr_bench.variance.recorder import GradientRecorder, block_statistics
from tgr_bench.variance.run import run
from tgr_bench.variance.tables import long_frame, write_all

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vit():
    """The catalogue's tiny ViT (6 blocks, 160 px), random weights."""
    return build_model(model_spec("test_vit"), WeightFile("random"), "cpu").model


def record(attack: MIFGSM, model, x, y, seeds=None):
    """(adversarial images, per-sample stats) of one recorded run of `attack`."""
    recorder = GradientRecorder(source_blocks(model), model.net)
    with attack.source_context(model), recorder.recording(attack):
        adv = attack.perturb(model, x, y, seeds or list(range(len(x))))
    return adv, recorder.take()


# ---- 1. the statistic --------------------------------------------------------------------------
def test_statistic_on_a_hand_made_gradient():
    # Two channels over N = 4 tokens: [1, 2, 3, 4] (mean 2.5, variance 5/4) and [0, 0, 0, -4]
    # (mean -1, variance (1 + 1 + 1 + 9) / 4 = 3). raw = (5/4 + 3) / 2 = 17/8;
    # mean |G| = (1 + 2 + 3 + 4 + 4) / 8 = 7/4; scale-free = (17/8) / (7/4)^2 = 34/49.
    tokens = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, -4.0]]])  # (1, N, C)
    scale_free, raw = block_statistics(tokens)
    assert raw.item() == pytest.approx(17 / 8, rel=1e-6)
    assert scale_free.item() == pytest.approx(34 / 49, rel=1e-6)
    # The same numbers as a (1, C, H, W) map: positions are the H*W entries of each channel.
    spatial = tokens.transpose(1, 2).reshape(1, 2, 2, 2)
    assert torch.allclose(block_statistics(spatial), torch.stack([scale_free, raw]))
    # Per sample: a second sample, 10 times larger, has the same scale-free value.
    both = block_statistics(torch.cat([tokens, 10 * tokens]))
    assert both[0, 1].item() == pytest.approx(34 / 49, rel=1e-6)
    assert both[1, 1].item() == pytest.approx(100 * 17 / 8, rel=1e-6)
    # A constant gradient has no variance; an all-zero one gives 0, not NaN.
    assert block_statistics(torch.ones(1, 5, 3)).abs().max().item() == 0
    assert block_statistics(torch.zeros(1, 5, 3)).abs().max().item() == 0


class TripledLoss(MIFGSM):
    """MI-FGSM with the loss times 3: every gradient of the backward pass scaled uniformly."""

    def loss(self, logits, y, delta, copies=1):
        return 3 * super().loss(logits, y, delta, copies)


def test_a_uniform_scaling_of_the_gradient_leaves_the_scale_free_variance(vit):
    x, y = batch(2)
    _, plain = record(make("mi", steps=2), vit, x, y)
    _, tripled = record(TripledLoss(make("mi", steps=2).settings), vit, x, y)
    assert torch.allclose(tripled.scale_free_var, plain.scale_free_var, rtol=1e-4)
    assert torch.allclose(tripled.raw_var, 9 * plain.raw_var, rtol=1e-4)
    assert torch.allclose(tripled.input_cos, plain.input_cos, atol=1e-6)
    assert plain.scale_free_var.shape == (6, 2) and plain.steps == 2


# ---- 2. the blocks of each family ----------------------------------------------------------------
@pytest.mark.parametrize(
    "family,count",
    [("vit", 2), ("deit", 2), ("pit", 2 + 2 + 1), ("cait", 2), ("visformer", 1 + 1 + 1)],
)
def test_blocks_of_the_tiny_transformers(family: str, count: int):
    model = tiny(family)
    blocks = source_blocks(model)
    assert len(blocks) == count
    net = model.net
    expected = {
        "vit": lambda: list(net.blocks),
        "deit": lambda: list(net.blocks),
        "pit": lambda: [b for t in net.transformers for b in t.blocks],
        "cait": lambda: list(net.blocks),  # not blocks_token_only
        "visformer": lambda: [*net.stage1, *net.stage2, *net.stage3],
    }[family]()
    assert [m for _, m in blocks] == expected


def test_blocks_of_the_catalogue_test_models(vit):
    assert [n for n, _ in source_blocks(vit)] == [f"blocks.{i}" for i in range(6)]
    resnet = build_model(model_spec("test_resnet"), WeightFile("random"), "cpu").model.net
    units = [
        u for layer in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4) for u in layer
    ]
    assert [m for _, m in source_blocks(resnet)] == units


@pytest.mark.parametrize(
    "name,count",
    [
        ("vit_base_patch16_224", 12),
        ("deit_base_distilled_patch16_224", 12),
        ("pit_b_224", 3 + 6 + 4),
        ("cait_s24_224", 24),
        ("visformer_small", 7 + 4 + 4),
        ("resnet50", 16),
        ("resnetv2_50x1_bit", 16),
        ("res_v2_101", 33),
    ],
)
def test_blocks_of_the_full_size_architectures(name: str, count: int):
    if name.startswith("res_v2"):
        net = create_network(name)  # meta device: no memory
    else:
        with torch.device("meta"):
            net = timm.create_model(name, pretrained=False)
    assert len(source_blocks(net)) == count


def test_every_family_has_a_block_table_and_others_are_refused():
    from tgr_bench.attacks.architectures import FAMILIES

    assert {f.name for f in FAMILIES} == set(BLOCKS)
    with torch.device("meta"):
        net = timm.create_model("convnext_tiny", pretrained=False)
    with pytest.raises(UserError, match="supported families are vit .*tf_resnet_v2"):
        source_blocks(net)


# ---- 3. recording is read-only ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["mi", "tgr"])
def test_recording_changes_no_adversarial_image(vit, name):
    x, y = batch(2)
    attack = make(name, "vit", steps=3)
    with attack.source_context(vit):
        plain = attack.perturb(vit, x, y, [0, 1])
    recorded, stats = record(make(name, "vit", steps=3), vit, x, y)
    clean = (x * 255).round().to(torch.uint8)
    assert torch.equal(quantize(recorded, clean, 16.0), quantize(plain, clean, 16.0))
    assert torch.equal(recorded, plain)
    assert stats.scale_free_var.isfinite().all() and stats.input_cos.shape == (2,)


def test_vmi_is_recorded_at_the_current_point_only(vit):
    """One recorded backward per step, at batch size B (the neighbours are not recorded), and
    its step-0 block gradients are MI's (the same point, the same loss)."""
    x, y = batch(2)
    _, mi = record(make("mi", steps=1), vit, x, y)
    _, vmi = record(make("vmi", steps=1, n_samples=3), vit, x, y)
    assert vmi.steps == 1 and vmi.scale_free_var.shape == (6, 2)
    assert torch.allclose(vmi.scale_free_var, mi.scale_free_var, rtol=1e-5)


# ---- 4. tables and plot ------------------------------------------------------------------------
def test_tables_and_plot_are_written_and_read_back(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    per_image = {
        a: {
            "scale_free_var": torch.rand(4, 5, generator=g, dtype=torch.float64) + s,
            "raw_var": torch.rand(4, 5, generator=g, dtype=torch.float64) * 1e-6,
            "input_cos": torch.rand(5, generator=g, dtype=torch.float64),
        }
        for s, a in enumerate(["mi", "vmi", "tgr"])
    }
    frame = long_frame(per_image, [f"blocks.{i}" for i in range(4)])
    write_all(frame, tmp_path, "test")
    df = pd.read_csv(tmp_path / "variance.csv")
    assert {"attack", "block", "statistic", "mean", "ci95", "n"} <= set(df.columns)
    assert set(df.statistic) == {"scale_free_var", "raw_var", "input_cos"}
    assert (df[df.statistic == "input_cos"].block == -1).all()
    assert len(df) == 3 * (2 * 4 + 1) and (df.n == 5).all()
    row = df[(df.attack == "vmi") & (df.block == 2) & (df.statistic == "scale_free_var")].iloc[0]
    values = per_image["vmi"]["scale_free_var"][2]
    assert row["mean"] == pytest.approx(values.mean().item())
    assert row.ci95 == pytest.approx(1.96 * values.std(correction=1).item() / 5**0.5)
    md = (tmp_path / "variance.md").read_text()
    first = md.split("## ")[1].splitlines()  # the scale-free table
    header = next(ln for ln in first if ln.startswith("| attack"))
    assert header == "| attack | 0 | 1 | 2 | 3 | mean |"
    assert [ln.split(" | ")[0] for ln in first if ln.startswith("| ") and ln != header] == [
        "| mi",
        "| vmi",
        "| tgr",
    ]
    assert r"\begin{tabular}" in (tmp_path / "variance.tex").read_text()
    png = (tmp_path / "variance.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


# ---- 5. config and console script ---------------------------------------------------------------
def test_every_attack_config_is_offered_with_its_defaults():
    cfg = compose(
        ["experiment=smoke", "source=test_vit", "attack_overrides.vmi.beta=1.0"], "variance"
    )
    offered = cfg.attack_overrides
    assert set(choices("attack")) | {"tgr_nozero"} == set(offered)
    assert offered.tgr_nozero.zero is False and offered.tgr.zero is True
    assert offered.vmi.beta == 1.0 and offered.vmi.n_samples == 20
    assert cfg.source.key == "test_vit" and cfg.data.labels == "source"


def test_run_called_directly_and_again(tmp_path: Path):
    """run(cfg, output_dir) without Hydra's app; one step gives no input_cos pair; the same
    analysis again finds it complete and computes nothing."""
    overrides = [
        "experiment=smoke",
        "source=test_vit",
        "attacks=[mi,sgm]",
        "data.n=3",
        "batch_size=2",
    ]
    overrides += [f"attack_overrides.{a}.steps=1" for a in ("mi", "sgm")]
    cfg = compose(overrides, "variance")
    rec = run(cfg, tmp_path)
    df = pd.read_csv(tmp_path / "variance.csv")
    assert set(df.statistic) == {"scale_free_var", "raw_var"} and set(df.n) == {3}
    assert len(df) == 2 * 2 * 6 and rec.analysis["attacks"][1]["params"]["gamma"] == 0.5
    before = (tmp_path / "variance.json").read_bytes()
    again = run(cfg, tmp_path)  # read back from variance.json, which is not written again
    assert again.analysis == json.loads(before)["analysis"] and again.status == "complete"
    assert (tmp_path / "variance.json").read_bytes() == before


def test_console_script_writes_every_file(tgr, tmp_path: Path):
    out = tmp_path / "run"
    r = tgr(
        "experiment=smoke",
        "source=test_vit",
        "attacks=[mi,tgr]",
        "data.n=2",
        "attack_overrides.mi.steps=2",
        "attack_overrides.tgr.steps=2",
        f"hydra.run.dir={out}",
        prog="tgr-bench-variance",
    )
    assert r.returncode == 0, r.stderr
    for name in ("variance.csv", "variance.md", "variance.tex", "variance.png", "variance.json"):
        assert (out / name).is_file(), name
    rec = json.loads((out / "variance.json").read_text())
    assert rec["status"] == "complete" and rec["source"]["family"] == "vit"
    analysis = rec["analysis"]
    assert [a["name"] for a in analysis["attacks"]] == ["mi", "tgr"]
    assert all(a["first_batch"]["identical_images"] for a in analysis["attacks"])
    assert analysis["cost"]["relative_to_crafting"] > 0 and len(analysis["images"]) == 2
    assert analysis["attacks"][1]["params"]["steps"] == 2 and "versions" in rec
    df = pd.read_csv(out / "variance.csv")
    assert sorted(set(df.attack)) == ["mi", "tgr"] and set(df.n) == {2}


@pytest.mark.parametrize(
    "args,message",
    [
        (["attacks=[mi,nosuch]"], "Unknown attack(s) ['nosuch'] in attacks=; available: "),
        (["source=test_convnext"], "No block table for the source test_convnext"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tgr, tmp_path, args: list[str], message: str):
    r = tgr(
        "experiment=smoke",
        "source=test_vit",
        *args,
        f"hydra.run.dir={tmp_path / 'run'}",
        prog="tgr-bench-variance",
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tgr-bench-variance: error: ")
    assert message in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "setting,named",
    [
        ("attack_overrides.mi.si.enabled=true", "si"),
        ("attack_overrides.mi.admix.enabled=true", "admix"),
        ("attack_overrides.mi.targeted=true", "targeted"),
    ],
)
def test_settings_the_statistics_cannot_mean_are_refused(tmp_path: Path, setting, named):
    """Copies would be counted as images, and the loop aims at the true labels."""
    overrides = ["experiment=smoke", "source=test_vit", "attacks=[mi]", "data.n=2", setting]
    cfg = compose(overrides, "variance")
    with pytest.raises(UserError, match=f"does not support {named}"):
        run(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
