"""Prefect tasks: one per stage, each a thin wrapper around its stage runner (tasks/stages).

Tasks take the run root and the config (a plain dict, validated again here) and return URIs,
never tensors. The cache key is the stage, its version constant, the config hash, the run's
root and id, the manifest's repair generation and the checksums of the stage's inputs in the
manifest (Prefect's default key
would look only at this file's source, not at the code it calls). Results are persisted.

A cached result stands for files on disk, so it is used only when they are there as recorded:
the flow's first task (`check_task`) checks every artifact of the manifest (storage/
integrity.py: a stat per file against the fingerprint recorded with the checksum, a full hash
where they differ) and fails naming each damaged file and the remedy, or with `repair`
forgets them and what was computed from them so the stages recompute exactly that. The cache
key itself is None (no cache) when one of the stage's inputs or outputs fails that check.

Progress goes to a Prefect progress artifact, created at 0 % as the stage's task starts and
moving while the stage runs (every count in it 1-based: "teacher 1 of 2, epoch 3 of 4"), and to
the run logger.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any, cast
from uuid import UUID

from prefect import Task, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger

from reporting.report import (
    KL_TABLE_BATCHES,
    REPORT,
    batch_records,
    inline_images,
    layer_kl_rows,
    layer_names,
    write_report,
)
from reporting.scores import run_accuracies, score_rows, table_rows
from storage.config import RunConfig, parse_config, run_id
from storage.fs import RunFS
from storage.integrity import (
    Problem,
    check,
    finish_pending_repair,
    plan_repair,
    refresh_fingerprints,
    repair,
)
from storage.manifest import REMEDY, BrokenManifest, CorruptArtifact, Manifest
from storage.run import attach_run, open_run, read_results

from .credentials import storage_options
from .retry import retry_on_transient_io
from .stage_table import Stage, stage
from .stages.match import match_run
from .terminal import TerminalProgress, bars_enabled, card_line, describe


def stage_cache_key(stage: Stage):
    """The cache key of `stage`'s task: its version, the config, the run, the repair
    generation and the checksums of what it reads (None where its files fail the check)."""

    def key(context: TaskRunContext, params: dict[str, Any]) -> str | None:
        root, cfg = params["root"], parse_config(params["config"])
        fs = RunFS(root, **storage_options(cfg))
        try:
            rid = run_id(fs)
        except FileNotFoundError:
            return None
        problems, _ = check(fs, quick=True, prefixes=(*stage.reads, *stage.writes))
        if problems:  # never stand for damaged files: run the stage, which names them
            return None
        manifest = Manifest(fs)
        entries = manifest.entries()
        inputs = sorted((k, v["sha256"]) for k, v in entries.items() if k.startswith(stage.reads))
        # The generation changes with every repair: results cached before it stand for files
        # it forgot.
        generation = manifest.generation()
        key = (stage.name, stage.version, cfg.config_hash(), fs.url(), rid, generation, inputs)
        return f"d3s-{stage.name}-" + hashlib.sha256(repr(key).encode()).hexdigest()

    return key


class PrefectProgress:
    """Stage progress callback: a progress artifact, created at 0 % ("<stage>: starting") as
    the stage task starts and updated at most every `every` seconds, and a log line at every
    tenth of the way. `finish` moves it to 100 % where the stage had nothing left to report
    (everything resumed, or run elsewhere)."""

    def __init__(self, stage: str, every: float = 2.0):
        self.stage, self.every = stage, every
        self.terminal = TerminalProgress() if bars_enabled() else None
        self.logger = get_run_logger()
        self.fraction = 0.0
        # Called synchronously: its result is the artifact's id (typed UUID | Coroutine).
        self.artifact = cast(UUID, create_progress_artifact(0.0, description=f"{stage}: starting"))
        self.last_update = time.time()
        self.last_tenth = -1

    def __call__(self, stage: str, fraction: float, info: dict[str, Any]) -> None:
        if self.terminal is not None:
            self.terminal(stage, fraction, info)
        now = time.time()
        desc = describe(info)
        first = self.last_tenth < 0  # the stage's first report (its unit) is shown at once
        if first or now - self.last_update >= self.every or fraction >= 1.0:
            card = card_line(stage, info)
            update_progress_artifact(self.artifact, 100 * fraction, description=card)
            self.last_update = now
        self.fraction = fraction
        if int(fraction * 10) > self.last_tenth:
            self.last_tenth = int(fraction * 10)
            self.logger.info("%s %.0f%% (%s)", stage, 100 * fraction, desc)

    def finish(self) -> None:
        if self.fraction < 1.0:
            update_progress_artifact(self.artifact, 100.0, description=f"{self.stage}: done")
            self.fraction = 1.0


@contextmanager
def forwarded_logs(logger: Any) -> Iterator[None]:
    """The stage runners' log records (logger "d3s": data provenance, recipe warnings) go to
    the task's run logger while the stage runs."""

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logger.log(record.levelno, record.getMessage())

    target, handler = logging.getLogger("d3s"), Forward()
    level, propagate = target.level, target.propagate
    target.addHandler(handler)
    target.setLevel(logging.INFO)
    target.propagate = False
    try:
        yield
    finally:
        target.removeHandler(handler)
        target.setLevel(level)
        target.propagate = propagate


def _run_stage(name: str, root: str, config: dict[str, Any]) -> Any:
    cfg = parse_config(config)
    progress = PrefectProgress(name)
    try:
        with open_run(root, cfg, **storage_options(cfg)) as run, forwarded_logs(progress.logger):
            result = stage(name).run(run, progress)
            progress.finish()
            return result
    finally:
        if progress.terminal is not None:
            progress.terminal.close()


StageTask = Task[[str, dict[str, Any]], object]  # its runner's result: URLs


@cache
def stage_task(name: str) -> StageTask:
    """The Prefect task of stage `name` (tasks/stage_table.py), made on first use."""
    s = stage(name)

    def fn(root: str, config: dict[str, Any]) -> object:
        return _run_stage(name, root, config)

    fn.__name__ = s.task_name()
    fn.__doc__ = s.doc
    # Retried on transient I/O only (an object store or network file system hiccup); the retry
    # resumes from the stage's checkpoint. Anything else fails at once.
    delays: list[float] = [10, 60, 300]
    if not s.cached:
        return task(
            name=name,
            task_run_name=name,
            cache_policy=NO_CACHE,
            retries=3,
            retry_delay_seconds=delays,
            retry_condition_fn=retry_on_transient_io,
        )(fn)
    return task(
        name=name,
        task_run_name=name,
        cache_key_fn=stage_cache_key(s),
        persist_result=True,
        retries=3,
        retry_delay_seconds=delays,
        retry_condition_fn=retry_on_transient_io,
    )(fn)


def validation_rows(groups: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The `validation` table: a row per student group ("student": the distilled set; any
    other name: the random real subset). One student has no spread: its std is "—", not 0."""
    return [
        {
            "students on": "distilled images" if name == "student" else "random real subset",
            "images": summary["distilled_images"],
            "n": summary["students"],
            "mean top1 %": round(100 * summary["mean"], 2),
            "std": round(100 * summary["std"], 2) if summary["students"] > 1 else "—",
        }
        for name, summary in groups
    ]


def publish_report(root: str, config: RunConfig) -> str:
    """The run's report (report/report.md + PNGs beside the artifacts) and its Prefect UI
    view: accuracy and per-layer KL tables, and the report as markdown with its images inline."""
    fs = RunFS(root, **storage_options(config))
    with attach_run(root, config, **storage_options(config)) as run:
        match_run(run)  # measured once per image set, kept in report/match.json
    report_url = write_report(fs, config)
    results = read_results(fs, config.teachers.count)
    rows = []
    for m, meta in enumerate(results["teachers"]):
        rows.append(
            {
                "model": f"teacher {m + 1}",  # people count from 1; files from 0
                "arch": meta["arch"],
                "top1 %": round(100 * meta["held_out_top1"], 2),
            }
        )
    groups = [("student", results["summary"])]
    if results["baseline"] is not None:
        groups.append(("random-real student", results["baseline"]))
    for name, summary in groups:
        for i, acc in enumerate(summary["top1"]):
            rows.append(
                {
                    "model": f"{name} {i + 1}",
                    "arch": config.student_arch(),
                    "top1 %": round(100 * acc, 2),
                }
            )
    create_table_artifact(rows, key="accuracy", description="held-out top-1")
    create_table_artifact(
        validation_rows(groups),
        key="validation",
        description="students' held-out top-1, mean ± std",  # one card line
    )
    scores = table_rows(score_rows(run_accuracies(fs)))
    if len(scores) > 1:
        create_table_artifact(
            scores,
            key="scores",
            description="image sets × protocols: top-1, IOR, HLR, LRS",  # one card line
        )
    kl_rows = layer_kl_rows(batch_records(fs), layer_names(fs, config.teachers.count))
    if kl_rows:
        create_table_artifact(
            kl_rows,
            key="synthesis-layer-kl",
            # One card line; the report's section says which batches are shown and why.
            description=f"per-layer loss at a batch's end, ≤ {KL_TABLE_BATCHES} batches",
        )
    markdown = fs.read_bytes(REPORT).decode()
    create_markdown_artifact(
        inline_images(fs, markdown) + f"\n\nreport file: `{report_url}`",
        key="summary",
        description="the run's report (report/report.md)",
    )
    create_markdown_artifact(
        inline_images(fs, "# Loss curves\n\n![loss curves](curves.png)"),
        key="loss-curves",
        description="teacher, synthesis and student loss curves",
    )
    return report_url


def check_run(root: str, config: RunConfig, fix: bool, log=print) -> list[str]:
    """Every artifact of the manifest against the disk (quick: fingerprints, hashes where they
    differ). Damage raises CorruptArtifact naming every file and the remedy; with `fix`, the
    damaged artifacts and what was computed from them are forgotten instead (returned), for
    the stages to recompute. The caller holds the writer lock."""
    fs = RunFS(root, **storage_options(config))
    finished = finish_pending_repair(fs)
    if finished:
        log(f"repair: finished an interrupted repair ({len(finished)} artifact(s) forgotten)")
    try:
        problems, fresh = check(fs, quick=True)
    except BrokenManifest:
        if not fix:
            raise  # names the file and `d3s repair ROOT`
        log(f"repair: {fs.url('manifest.json')}: {Manifest(fs).restore_previous()}")
        problems, fresh = check(fs, quick=True)
    refresh_fingerprints(fs, fresh)
    if not problems:
        return []
    listing = "; ".join(f"{fs.url(p.rel)}: {p.status}, {p.detail}" for p in problems)
    if not fix:
        raise CorruptArtifact(
            f"{len(problems)} damaged or missing artifact(s): {listing}. "
            + REMEDY.format(root=fs.url())
        )
    return _forget(fs, problems, listing, log)


def _forget(fs: RunFS, problems: list[Problem], found: str, log) -> list[str]:
    """Repair `problems` (forget them and what was computed from them), logged; the forgotten
    artifacts."""
    plan = plan_repair(fs, problems)
    repair(fs, plan)
    batches = f" (synthesis from batch {plan.first_batch})" if plan.first_batch else ""
    log(f"repair: {found}; forgot {len(plan.forget)} artifact(s){batches}: {plan.forget}")
    return plan.forget


@task(name="check", task_run_name="check-artifacts", cache_policy=NO_CACHE)
def check_task(root: str, config: dict[str, Any], fix: bool = False) -> list[str]:
    return check_run(root, parse_config(config), fix, get_run_logger().warning)


def repair_found(root: str, config: RunConfig, rel: str, found: str, log=print) -> list[str]:
    """Forget `rel` (which a stage found damaged: a full hash, a file it could not read, a
    commit record) and what was computed from it, for the stages to recompute."""
    fs = RunFS(root, **storage_options(config))
    return _forget(fs, [Problem(rel, "damaged", found)], found, log)


@task(name="repair", task_run_name="repair-{rel}", cache_policy=NO_CACHE)
def repair_task(root: str, config: dict[str, Any], rel: str, found: str) -> list[str]:
    return repair_found(root, parse_config(config), rel, found, get_run_logger().warning)


# Not cached: the report is cheap and reflects the run as it is now.
@task(name="report", task_run_name="report", cache_policy=NO_CACHE)
def report_task(root: str, config: dict[str, Any]) -> str:
    return publish_report(root, parse_config(config))
