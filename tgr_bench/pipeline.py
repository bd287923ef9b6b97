"""One run: plan -> craft -> evaluate -> write. `run(cfg)` is what the CLI calls and what tests
call directly."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from rich.console import Console

from tgr_bench import provenance
from tgr_bench.advsets import AdvSet, linf_levels_max, load_sets
from tgr_bench.console import make_console, progress, to_log_files
from tgr_bench.crafting import craft, image_seeds
from tgr_bench.data import ImageSet
from tgr_bench.errors import Interrupted, Terminated, UserError, exit_code_of
from tgr_bench.evaluate import CleanCache, evaluate_sets, predict
from tgr_bench.models import LoadedModel, build_model
from tgr_bench.plan import Plan, make_plan
from tgr_bench.record import IMAGES_DIR, MANIFEST, AdvSetInfo, DataInfo, RunRecord
from tgr_bench.report.run_results import print_run_results, results_frame, write_run_results
from tgr_bench.resume import Manifest, finished, run_lock
from tgr_bench.targets import choose_targets, write_targets

log = logging.getLogger(__name__)


def _output_dir(output_dir: str | Path | None) -> Path:
    if output_dir is not None:
        return Path(output_dir)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise UserError("No output directory: call run(cfg, output_dir=...) or run through tgr-bench.")


def _new_record(plan: Plan) -> RunRecord:
    record = RunRecord(
        identity=plan.identity,
        config=plan.config,
        started=provenance.now(),
        versions=provenance.versions(),
        git_commit=provenance.git_commit(),
        device=provenance.device_info(plan.runtime.device),
        target_keys=[t.spec.key for t in plan.targets],
    )
    if plan.attack is not None and plan.source is not None:
        record.attack = {
            "label": plan.attack.label,
            "reference": plan.attack.reference,
            "params": plan.attack.params(),
            "defaults": plan.attack.defaults(),
        }
        record.sets = [
            AdvSetInfo(
                run_id=plan.identity.run_id,
                folder=str((plan.out_dir / IMAGES_DIR).resolve()),
                source=plan.source.key,
                attack=plan.attack.label,
                params=plan.attack.params(),
                identity=plan.identity,
                defaults=plan.attack.defaults(),
            )
        ]
    else:
        record.sets = list(plan.external)
    return record


def _data_info(data: ImageSet) -> DataInfo:
    return DataInfo(
        root=data.root,
        layout=data.layout,
        n_images=len(data),
        sha256=data.digest,
        shard=data.shard,
        unlabeled_skipped=data.unlabeled_skipped,
        pool_sha256=data.pool_sha256,
    )


def prepare_source(
    *, plan: Plan, record: RunRecord, attacking: contextlib.ExitStack
) -> tuple[LoadedModel, ImageSet]:
    """Build the source, relabel a synthetic smoke set when asked, and enter the attack's source
    context (which proves its hooks fire). Runs before the run directory is locked, so an
    unsupported source writes nothing."""
    assert plan.attack is not None and plan.source is not None and plan.source_weights
    rt = plan.runtime
    source = build_model(plan.source, plan.source_weights, rt.device, rt.seed)
    source.model.set_speed(rt.precision)
    if plan.source_weights.kind == "random" and not (plan.source.model or "").startswith("test_"):
        log.warning("Source %s has random weights (pretrained=false)", plan.source.key)
    record.source = source.provenance()
    data = plan.data
    if data.layout == "synthetic" and plan.data_spec.labels == "source":
        # Random-weight smoke models know no ImageNet: label each synthetic image with the
        # source's clean prediction so the white-box success rate means something.
        data = data.with_labels(predict(source.model, data.pixels, rt.eval_batch_size, rt.device))
    if plan.attack.targeted:
        seeds = image_seeds(data.stems, rt.seed)
        targets = choose_targets(
            plan.attack.target, data, seeds, source.model, rt.eval_batch_size, rt.device
        )
        data = data.with_targets(targets)
    if plan.attack.admix is not None:
        assert data.pool is not None and data.pool_sha256 is not None  # plan: checked_pool()
        plan.attack.use_pool(data.pool)
    attacking.enter_context(plan.attack.source_context(source.model))
    return source, data


def open_manifest(*, plan: Plan, data: ImageSet) -> Manifest:
    """The run directory's manifest; refuses images crafted with other settings, before the
    run's record is written over the one that describes them."""
    assert plan.source_weights is not None
    return Manifest(
        plan.out_dir / MANIFEST,
        {
            **plan.identity.content(),
            "source_weights_sha256": plan.source_weights.sha256,
            "data_sha256": data.digest,
        },
    )


def craft_images(
    *,
    plan: Plan,
    record: RunRecord,
    source: LoadedModel,
    data: ImageSet,
    manifest: Manifest,
    console: Console,
) -> AdvSet:
    """Attack every image not yet saved; returns the saved set (resumed images included)."""
    assert plan.attack is not None
    rt = plan.runtime
    if plan.attack.targeted:
        write_targets(plan.out_dir, data, data.targets)
    with progress(console) as bars:
        record.crafting = craft(
            attack=plan.attack,
            source=source,
            data=data,
            manifest=manifest,
            images_dir=plan.out_dir / IMAGES_DIR,
            batch_size=rt.batch_size,
            device=rt.device,
            seed=rt.seed,
            progress=bars,
        )
    (own,) = load_sets(record.sets, data)  # evaluate what was saved, read back from the PNGs
    return own


def evaluate_step(
    *, plan: Plan, record: RunRecord, data: ImageSet, sets: list[AdvSet], console: Console
) -> tuple[list[dict[str, Any]], Any]:
    rt = plan.runtime
    with progress(console) as bars:
        rows, loaded, predictions = evaluate_sets(
            targets=[(t.spec, t.weights) for t in plan.targets],
            data=data,
            adv_sets=sets,
            batch_size=rt.eval_batch_size,
            device=rt.device,
            seed=rt.seed,
            cache=CleanCache(rt.cache_dir),
            progress=bars,
            precision=rt.precision,
        )
    record.targets = loaded
    return rows, predictions


def write_step(
    *,
    plan: Plan,
    record: RunRecord,
    rows: list[dict[str, Any]],
    predictions: Any,
    data: ImageSet,
    console: Console,
) -> None:
    if rows:
        df = results_frame(rows)
        write_run_results(df, predictions, plan.out_dir)
        for info in record.sets:
            part = df[df.run_id == info.run_id]
            title = f"{info.attack} on {info.source}: {len(data)} images"
            print_run_results(part, title, console)
    record.status = "complete"
    record.finished = provenance.now()
    record.save(plan.out_dir)


def _stopped_summary(plan: Plan, data: ImageSet, signal_error: BaseException) -> str:
    """One line for a run stopped by a signal: what is saved, how to resume."""
    what = "Ctrl-C" if isinstance(signal_error, KeyboardInterrupt) else "SIGTERM"
    if plan.crafting:
        saved = len(Manifest.entries(plan.out_dir / MANIFEST))
        return (
            f"stopped by {what}: {saved}/{len(data)} images saved and recorded in "
            f"{plan.out_dir}; re-run the same command to resume (no results written yet)."
        )
    return (
        f"stopped by {what} while evaluating; nothing was written to {plan.out_dir} but its "
        f"record; re-run the same command to evaluate again."
    )


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> RunRecord:
    """Validate, craft, evaluate, write results.csv / results.md / run.json; return the record."""
    console = make_console()
    plan = make_plan(cfg, _output_dir(output_dir))
    done = finished(plan.out_dir, plan.config, plan.data.stems)
    if done is not None:
        console.print(
            f"[green]already complete:[/green] {plan.out_dir} (same config); nothing to do"
        )
        return done
    for target in plan.targets:
        if target.skipped:
            console.print(f"[yellow]skipping target {target.spec.key}:[/yellow] {target.skipped}")
    record = _new_record(plan)
    record.determinism = plan.runtime.apply()
    with contextlib.ExitStack() as attacking:
        data, source = plan.data, None
        if plan.crafting:
            source, data = prepare_source(plan=plan, record=record, attacking=attacking)
        record.data = _data_info(data)
        with run_lock(plan.out_dir):
            manifest = open_manifest(plan=plan, data=data) if plan.crafting else None
            record.save(plan.out_dir)  # status "running": the settings are valid from here on
            try:
                if plan.crafting:
                    assert manifest is not None
                    own = craft_images(
                        plan=plan,
                        record=record,
                        source=source,
                        data=data,
                        manifest=manifest,
                        console=console,
                    )
                    sets = [own]
                    attacking.close()  # leaves the source context: checks the fired counts
                    record.crafting.hooks = plan.attack.stats()  # type: ignore[union-attr]
                    source = None  # frees the source before the targets are loaded
                else:
                    sets = load_sets(record.sets, data)
                c = record.crafting
                if not plan.crafting or c.resumed:
                    # Images this process did not quantize itself: read them back and check.
                    c.linf_levels_max = max(c.linf_levels_max or 0, linf_levels_max(data, sets))
                rows, predictions = evaluate_step(
                    plan=plan, record=record, data=data, sets=sets, console=console
                )
                write_step(
                    plan=plan,
                    record=record,
                    rows=rows,
                    predictions=predictions,
                    data=data,
                    console=console,
                )
            except BaseException as e:
                stopped = isinstance(e, KeyboardInterrupt | Terminated)
                record.status = "interrupted" if stopped else "failed"
                record.error = f"{type(e).__name__}: {e}"
                record.finished = provenance.now()
                with contextlib.suppress(Exception):
                    record.save(plan.out_dir)
                if stopped:
                    raise Interrupted(_stopped_summary(plan, data, e), exit_code_of(e)) from e
                raise
    c = record.crafting
    if plan.crafting:
        summary = (
            f"{len(data)} images: {c.attacked} attacked, {c.resumed} resumed from an earlier "
            f"run, 0 failed"
        )
    else:
        summary = f"evaluated {len(data)} images of {len(record.sets)} folder(s)"
        if plan.present_of is not None:
            summary += f" (the ones present, of {plan.present_of} clean images)"
    if data.unlabeled_skipped:
        summary += f", {data.unlabeled_skipped} skipped without a label"
    summary += f"; results in {plan.out_dir}"
    console.print(f"[green]done:[/green] {summary}")
    to_log_files(logging.INFO, f"Run complete: {summary}")
    return record
