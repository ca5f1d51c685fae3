"""The study flow `d3s-study`: teachers and statistics once (in `shared/`), then every variant
as a subflow on its own run root, seeded with the shared artifacts (and with the images and
label epochs of an earlier variant whose config makes them the same): `d3s-distill` for a
distilled set, `d3s-baseline` for a baseline (random real subset, coreset, full-data
reference); then the distribution match of every image set and the study report.
Resumable like a run: a new flow run with the same root and study config verifies what is
finished and continues.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from storage.config import RunConfig
from storage.run import open_run
from storage.study import SHARED, StudySpec, plan_study
from tasks.credentials import storage_options
from tasks.dask_stages import on_dask, stats_plan_task, stats_shards_flow
from tasks.prefect_tasks import (
    baseline_task,
    coresets_task,
    full_data_task,
    stats_task,
    teachers_task,
)
from tasks.study_tasks import at, match_task, share_task, study_report_task

from .distill import distill


def _study_name() -> str:
    spec = flow_run.parameters.get("config")
    name = spec.name if isinstance(spec, StudySpec) else (spec or {}).get("name", "study")
    return f"study-{name}"


def _baseline_name() -> str:
    cfg = flow_run.parameters.get("config")
    return cfg.name if isinstance(cfg, RunConfig) else str(flow_run.parameters.get("kind"))


# The stage task of each baseline kind; the plan (storage/study.py) sets the config's
# validation switches so that the task runs that kind's image set only.
BASELINE_TASKS = {
    "random-real": baseline_task,
    "herding": coresets_task,
    "k-center": coresets_task,
    "full-data": full_data_task,
}


@flow(name="d3s-baseline", flow_run_name=_baseline_name, log_prints=True)
def baseline(root: str, config: RunConfig, kind: str = "random-real") -> list[str]:
    """One baseline alone on a run root that already has its teachers: the random real subset,
    a coreset (herding, k-center) or the full-data reference, validated under its protocols.
    Returns the URIs of its validation summaries."""
    if kind not in BASELINE_TASKS:
        raise ValueError(f"unknown baseline {kind!r}; expected one of {sorted(BASELINE_TASKS)}")
    with open_run(root, config, **storage_options(config)):
        got = BASELINE_TASKS[kind](root, config.model_dump(mode="json"))
    return list(got) if isinstance(got, list) else [got]


@flow(name="d3s-study", flow_run_name=_study_name, log_prints=True)
def study(root: str, config: StudySpec) -> str:
    """Run (or resume) a study; returns the report's URI."""
    plan = plan_study(config)  # every variant validated before anything runs
    spec = config.model_dump(mode="json")
    shared, base = at(root, SHARED), plan.shared
    c = base.model_dump(mode="json")
    with open_run(shared, base, **storage_options(base)):
        t = teachers_task(shared, c)
        if base.dask is not None:
            todo = stats_plan_task(shared, c, wait_for=[t])
            if todo:
                on_dask(stats_shards_flow, base.dask)(shared, c, todo)
        stats_task(shared, c, wait_for=[t])
    for cell in plan.cells:
        share_task(root, spec, cell.name)
        if cell.kind == "d3s":
            distill(root=at(root, cell.root), config=cell.config)
        else:
            baseline(root=at(root, cell.root), config=cell.config, kind=cell.kind)
    match_task(root, spec)
    return study_report_task(root, spec)
