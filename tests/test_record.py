"""The run record: what identifies a run, and run.json read back."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf, open_dict

from tgr_bench.pipeline import run
from tgr_bench.plan import resolve
from tgr_bench.record import RunRecord


def identity_of(cfg):
    return resolve(cfg, keep=False).identity


def test_a_config_key_that_changes_nothing_changes_no_run_id(make_cfg):
    """A disabled modifier (PatchOut here) and a runtime key leave the run id alone: the
    identity is built from the attack's resolved params(), not from the raw attack config."""
    base = make_cfg("attack=tgr", "data=synthetic")
    reference = identity_of(base).run_id
    without = OmegaConf.create(OmegaConf.to_container(base))
    with open_dict(without):
        del without.attack["patchout"]  # as if the modifier had never been added
        without.batch_size = 3  # a key that changes no image
    assert identity_of(without).run_id == reference
    enabled = make_cfg("attack=tgr", "data=synthetic", "attack.patchout.enabled=true")
    assert identity_of(enabled).run_id != reference


def test_identity_comes_from_resolved_values(make_cfg):
    """alpha=null means eps/steps: spelling the default out is the same run."""
    implicit = identity_of(make_cfg("attack=tgr", "data=synthetic"))
    explicit = identity_of(make_cfg("attack=tgr", "data=synthetic", "attack.alpha=1.6"))
    assert implicit == explicit and implicit.run_id == explicit.run_id
    other = identity_of(make_cfg("attack=tgr", "data=synthetic", "attack.k=2"))
    assert other.run_id != implicit.run_id
    assert identity_of(make_cfg("attack=tgr", "data=synthetic", "precision=bf16")) != implicit
    # Runtime settings that cannot change an image are not part of it.
    for knob in ("batch_size=3", "eval_batch_size=5", "device=cpu", "cache_dir=null"):
        assert identity_of(make_cfg("attack=tgr", "data=synthetic", knob)) == implicit


def test_shards_share_one_cell(make_cfg):
    a = identity_of(make_cfg("data=synthetic", "data.num_shards=2", "data.shard=0"))
    b = identity_of(make_cfg("data=synthetic", "data.num_shards=2", "data.shard=1"))
    assert a.run_id != b.run_id and a.cell() == b.cell()
    assert a.shard == (0, 2)


def test_run_json_reads_back_as_the_same_record(make_cfg, tmp_path: Path):
    record = run(
        make_cfg("experiment=smoke", "data.n=2", "attack.steps=1", "targets=none"),
        output_dir=tmp_path,
    )
    again = RunRecord.load(tmp_path)
    assert again == record and again.complete
    assert again.identity.run_id == record.sets[0].run_id
    assert RunRecord.load(tmp_path / "nowhere") is None
