"""One run: plan -> craft -> evaluate -> write. `run(cfg)` is what the CLI calls and what tests
call directly. The stages that do not depend on what a run computes (the output folder, the
record, the source, the lock and the record of a failure) are shared with the variance
analysis (tgr_bench/variance/run.py)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from rich.console import Console

from tgr_bench import provenance
from tgr_bench.advsets import AdvSet, load_sets
from tgr_bench.aims import choose_aims, write_aims
from tgr_bench.console import make_console, progress, to_log_files
from tgr_bench.crafting import craft, image_seeds
from tgr_bench.data import ImageSet, source_labelled, write_run_labels
from tgr_bench.errors import Interrupted, Terminated, UserError, exit_code_of
from tgr_bench.evaluate import CleanCache, evaluate_sets
from tgr_bench.images import check_saved
from tgr_bench.models import LoadedModel, ModelSpec, WeightFile, build_model
from tgr_bench.plan import Plan, make_plan
from tgr_bench.predict import predict
from tgr_bench.record import IMAGES_DIR, MANIFEST, RUN_JSON, AdvSetInfo, DataInfo, RunRecord
from tgr_bench.results import print_run_results, results_frame, write_run_results
from tgr_bench.resume import Manifest, finished, run_lock
from tgr_bench.settings import Runtime

log = logging.getLogger(__name__)


# ---- stages shared with the variance analysis ---------------------------------------------------
def resolve_output_dir(given: str | Path | None) -> Path:
    """`given`, or the run directory Hydra made for this job."""
    if given is not None:
        return Path(given)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise UserError("No output directory: call run(cfg, output_dir=...) or run through tgr-bench.")


def new_record(identity: Any, config: dict[str, Any], runtime: Runtime) -> RunRecord:
    """A run record with everything a result needs to be reproduced, status `running`."""
    return RunRecord(
        identity=identity,
        config=config,
        started=provenance.now(),
        versions=provenance.versions(),
        git_commit=provenance.git_commit(),
        device=provenance.device_info(runtime.device),
    )


def build_source(spec: ModelSpec, weights: WeightFile, runtime: Runtime) -> LoadedModel:
    """The source model on the device, in the run's precision."""
    source = build_model(spec, weights, runtime.device, runtime.seed)
    source.model.set_speed(runtime.precision)
    if weights.kind == "random" and not (spec.model or "").startswith("test_"):
        log.warning("Source %s has random weights (pretrained=false)", spec.key)
    return source


def smoke_labels(data: ImageSet, spec: Any, source: LoadedModel, runtime: Runtime) -> ImageSet:
    """Random-weight smoke models know no ImageNet: with data.labels=source, each synthetic
    image is labelled with the source's clean prediction, so the white-box rate means
    something."""
    if not source_labelled(spec):
        return data
    preds = predict(source.model, data.pixels, runtime.eval_batch_size, runtime.device)
    return data.with_labels(preds)


def data_info(data: ImageSet) -> DataInfo:
    return DataInfo(
        root=data.root,
        layout=data.layout,
        n_images=len(data),
        sha256=data.digest,
        shard=data.shard,
        unlabeled_skipped=data.unlabeled_skipped,
        pool_sha256=data.pool_sha256,
    )


@contextlib.contextmanager
def recorded(
    record: RunRecord,
    out_dir: Path,
    stopped: Callable[[BaseException], str],
    name: str = RUN_JSON,
) -> Iterator[None]:
    """Save the record (status `running`: the settings are valid from here on); on the way
    out of a failure save it as `failed` or `interrupted`, and turn Ctrl-C / SIGTERM into one
    line saying what is saved (`stopped`)."""
    record.save(out_dir, name)
    try:
        yield
    except BaseException as e:
        signal = isinstance(e, KeyboardInterrupt | Terminated)
        record.status = "interrupted" if signal else "failed"
        record.error = f"{type(e).__name__}: {e}"
        record.finished = provenance.now()
        with contextlib.suppress(Exception):
            record.save(out_dir, name)
        if signal:
            raise Interrupted(stopped(e), exit_code_of(e)) from e
        raise


def complete(record: RunRecord, out_dir: Path, name: str = RUN_JSON) -> None:
    record.status = "complete"
    record.finished = provenance.now()
    record.save(out_dir, name)


# ---- the stages of tgr-bench ---------------------------------------------------------------
def run_record(plan: Plan) -> RunRecord:
    record = new_record(plan.identity, plan.config, plan.runtime)
    record.target_keys = [t.spec.key for t in plan.targets]
    attack = plan.attack
    if attack is None or plan.source is None:
        record.sets = list(plan.external)
        return record
    record.attack = {
        "label": attack.label,
        "reference": attack.reference,
        "params": attack.params(),
        "defaults": attack.defaults(),
    }
    record.sets = [
        AdvSetInfo(
            run_id=plan.identity.run_id,
            folder=str((plan.out_dir / IMAGES_DIR).resolve()),
            source=plan.source.key,
            attack=attack.label,
            params=attack.params(),
            identity=plan.identity,
            defaults=attack.defaults(),
        )
    ]
    return record


def prepare_source(
    *, plan: Plan, record: RunRecord, attacking: contextlib.ExitStack
) -> tuple[LoadedModel, ImageSet]:
    """Build the source, label a synthetic smoke set, choose a targeted attack's aims, and
    enter the attack's source context (which proves its hooks fire). Runs before the run
    directory is locked, so an unsupported source writes nothing."""
    assert plan.attack is not None and plan.source is not None and plan.source_weights
    rt, attack = plan.runtime, plan.attack
    source = build_source(plan.source, plan.source_weights, rt)
    record.source = source.provenance()
    data = smoke_labels(plan.data, plan.spec.data, source, rt)
    if attack.targeted:
        seeds = image_seeds(data.stems, rt.seed)
        aims = choose_aims(attack.target, data, seeds, source.model, rt.eval_batch_size, rt.device)
        data = data.with_aims(aims)
    if attack.admix is not None:
        assert data.pool is not None and data.pool_sha256 is not None  # plan: checked_pool()
        attack.use_pool(data.pool)
    attacking.enter_context(attack.source_context(source.model))
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
    attacking: contextlib.ExitStack,
) -> list[AdvSet]:
    """Attack every image not yet saved; returns the saved set (resumed images included), read
    back from the PNGs. Leaving the source context checks the hooks' fired counts."""
    attack = plan.attack
    assert attack is not None
    rt = plan.runtime
    if attack.targeted:
        write_aims(plan.out_dir, data, data.aims)
    if source_labelled(plan.spec.data):
        write_run_labels(plan.out_dir, data)
    with progress(console) as bars:
        craft(
            attack=attack,
            source=source,
            data=data,
            manifest=manifest,
            images_dir=plan.out_dir / IMAGES_DIR,
            batch_size=rt.batch_size,
            device=rt.device,
            seed=rt.seed,
            progress=bars,
            stats=record.crafting,
        )
    attacking.close()
    record.crafting.hooks = attack.stats()
    return load_sets(record.sets, data)


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
            defenses=plan.spec.settings.load_defenses(),
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
    complete(record, plan.out_dir)


def _stopped(plan: Plan, data: ImageSet) -> Callable[[BaseException], str]:
    def summary(signal_error: BaseException) -> str:
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

    return summary


def _summary(plan: Plan, record: RunRecord, data: ImageSet) -> str:
    c = record.crafting
    if plan.crafting:
        text = (
            f"{len(data)} images: {c.attacked} attacked, {c.resumed} resumed from an earlier "
            f"run, 0 failed"
        )
    else:
        text = f"evaluated {len(data)} images of {len(record.sets)} folder(s)"
        if plan.present_of is not None:
            text += f" (the ones present, of {plan.present_of} clean images)"
    if data.unlabeled_skipped:
        text += f", {data.unlabeled_skipped} skipped without a label"
    return text + f"; results in {plan.out_dir}"


def _already_complete(plan: Plan, console: Console) -> RunRecord | None:
    done = finished(plan.out_dir, plan.config, plan.data.stems)
    if done is not None:
        console.print(
            f"[green]already complete:[/green] {plan.out_dir} (same config); nothing to do"
        )
    for target in plan.targets if done is None else []:
        if target.skipped:
            console.print(f"[yellow]skipping target {target.spec.key}:[/yellow] {target.skipped}")
    return done


def _finish(
    plan: Plan, record: RunRecord, data: ImageSet, sets: list[AdvSet], console: Console
) -> None:
    """Check the saved pixels against eps, evaluate every set on every target, write."""
    check_saved(record.crafting, data.pixels, [s.pixels for s in sets], plan.crafting)
    rows, predictions = evaluate_step(
        plan=plan, record=record, data=data, sets=sets, console=console
    )
    write_step(
        plan=plan, record=record, rows=rows, predictions=predictions, data=data, console=console
    )


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> RunRecord:
    """Validate, craft, evaluate, write results.csv / results.md / run.json; return the record."""
    console = make_console()
    plan = make_plan(cfg, resolve_output_dir(output_dir))
    done = _already_complete(plan, console)
    if done is not None:
        return done
    record = run_record(plan)
    record.determinism = plan.runtime.apply()
    with contextlib.ExitStack() as attacking:
        source, data = None, plan.data
        if plan.crafting:
            source, data = prepare_source(plan=plan, record=record, attacking=attacking)
        record.data = data_info(data)
        with run_lock(plan.out_dir):
            manifest = open_manifest(plan=plan, data=data) if plan.crafting else None
            with recorded(record, plan.out_dir, _stopped(plan, data)):
                if source is not None and manifest is not None:
                    sets = craft_images(
                        plan=plan,
                        record=record,
                        source=source,
                        data=data,
                        manifest=manifest,
                        console=console,
                        attacking=attacking,
                    )
                    source = None  # frees the source before the targets are loaded
                else:
                    sets = load_sets(record.sets, data)
                _finish(plan, record, data, sets, console)
    summary = _summary(plan, record, data)
    console.print(f"[green]done:[/green] {summary}")
    to_log_files(logging.INFO, f"Run complete: {summary}")
    return record
