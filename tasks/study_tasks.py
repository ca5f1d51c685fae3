"""Prefect tasks of a study (flows/study.py): seeding a cell's run root from the shared run
and earlier cells (an I/O step), and the study report with its UI artifacts."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from reporting.report import inline_images
from reporting.scores import table_rows
from reporting.study_report import STUDY_MD, score_rows_of, write_study_report
from storage.fs import RunFS
from storage.run import attach_run, images_of, open_run
from storage.share import seed_run
from storage.study import SHARED, StudySpec, plan_study, read_match, write_match

from .credentials import storage_options
from .retry import retry_on_transient_io
from .stages.match import match_unless_known


def at(root: str, rel: str) -> str:
    """`rel` under a study root (a path or URL)."""
    return f"{root.rstrip('/')}/{rel}"


def _share(root: str, config: dict[str, Any], cell: str) -> dict[str, list[str]]:
    plan = plan_study(StudySpec.model_validate(config))
    c = plan.cell(cell)
    options = storage_options(c.config)

    def fs(rel: str | None) -> RunFS | None:
        return None if rel is None else RunFS(at(root, rel), **options)

    with open_run(at(root, c.root), c.config, **options) as run:
        seeded = seed_run(
            run.fs,
            RunFS(at(root, SHARED), **options),
            stats=c.kind == "d3s",
            images_from=fs(c.images_from and plan.cell(c.images_from).root),
            labels_from=fs(c.labels_from and plan.cell(c.labels_from).root),
            label_epochs=c.config.labels.epochs,
        )
    get_run_logger().info(
        "%s: seeded %s", cell, ", ".join(f"{k} ({len(v)})" for k, v in seeded.items())
    )
    return seeded


# Not cached: cheap and idempotent (an artifact already seeded is verified and kept).
share_task = task(
    name="share",
    task_run_name="share-{cell}",
    retries=3,
    retry_delay_seconds=[10, 60, 300],
    retry_condition_fn=retry_on_transient_io,
)(_share)


def _match(root: str, config: dict[str, Any]) -> list[str]:
    """Measure every cell's own image set (the distilled set, the random real subset or a
    coreset; the full-data reference has none) against the shared teachers' full-dataset
    statistics (tasks/stages/match.py); a cell already measured on the same images is kept.
    Returns the cells measured now."""
    plan = plan_study(StudySpec.model_validate(config))
    options = storage_options(plan.shared)
    fs = RunFS(root, **options)
    shared = attach_run(at(root, SHARED), plan.shared, **options)
    measured = []
    for c in plan.cells:
        if c.images_from is not None or not c.has_images:
            continue  # the same images as an earlier cell, or no image set
        cell_fs = RunFS(at(root, c.root), **options)
        rel = images_of(c.prefix)
        known = read_match(fs, c.name)
        result = match_unless_known(shared, cell_fs, rel, known)
        if result is not known:
            write_match(fs, c.name, result)
            measured.append(c.name)
    get_run_logger().info("distribution match measured for %d cell(s)", len(measured))
    return measured


# Not cached: cheap when nothing changed (each cell's numbers are kept with its images' hash).
match_task = task(name="study-match", task_run_name="study-match")(_match)


def _report(root: str, config: dict[str, Any]) -> str:
    spec = StudySpec.model_validate(config)
    plan = plan_study(spec)
    fs = RunFS(root, **storage_options(plan.shared))
    data = write_study_report(fs, spec, plan)
    hard = any("hard" in r["protocols"] for r in data["variants"])

    def pct(x: float | None) -> float | None:
        return None if x is None else round(100 * x, 2)

    rows = []
    for r in data["variants"]:
        row = {
            "variant": r["variant"],
            "kind": r["kind"],
            "images": r["images"],
            "n": r["n"],
            "mean top1 %": pct(r["mean"]),
            "std": pct(r["std"]) if r["n"] > 1 else "—",
            f"delta vs {plan.reference}": pct(r["delta_vs_reference"]),
            "delta vs random real": pct(r["delta_vs_random_real"]),
        }
        if hard:
            row["hard top1 %"] = pct(r["protocols"].get("hard", {}).get("mean"))
        rows.append(row)
    create_table_artifact(
        rows,
        key="study-variants",
        description="students' top-1 per variant, mean ± std (soft protocol where the variant "
        "has it, else hard)",
    )
    create_table_artifact(
        table_rows(score_rows_of(data)),
        key="study-scores",
        description="every variant under every protocol: top-1 and DD-Ranking's IOR, HLR, LRS "
        "(docs/study.md, 'Scores')",
    )
    create_markdown_artifact(
        inline_images(fs, fs.read_bytes(STUDY_MD).decode())
        + f"\n\nreport file: `{fs.url(STUDY_MD)}`",
        key="study",
        description="the study's report (report/study.md)",
    )
    return fs.url(STUDY_MD)


# Not cached: reflects the cells as they are now.
study_report_task = task(name="study-report", task_run_name="study-report")(_report)
