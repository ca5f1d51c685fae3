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
from tasks.dask_stages import stats_fanout
from tasks.prefect_tasks import stage_task
from tasks.study_tasks import at, match_task, share_task, study_report_task

from .distill import distill


def _study_name() -> str:
    spec = flow_run.parameters.get("config")
    name = spec.name if isinstance(spec, StudySpec) else (spec or {}).get("name", "study")
    return f"study-{name}"


def _baseline_name() -> str:
    cfg = flow_run.parameters.get("config")
    return cfg.name if isinstance(cfg, RunConfig) else str(flow_run.parameters.get("kind"))


# The stage of each baseline kind (tasks/stage_table.py); the plan (storage/study.py) sets the
# config's validation switches so that the stage runs that kind's image set only.
BASELINE_STAGES = {
    "random-real": "baseline",
    "herding": "coresets",
    "k-center": "coresets",
    "full-data": "full-data",
}


@flow(name="d3s-baseline", flow_run_name=_baseline_name, log_prints=True)
def baseline(root: str, config: RunConfig, kind: str = "random-real") -> list[str]:
    """One baseline alone on a run root that already has its teachers: the random real subset,
    a coreset (herding, k-center) or the full-data reference, validated under its protocols.
    Returns the URIs of its validation summaries."""
    if kind not in BASELINE_STAGES:
        raise ValueError(f"unknown baseline {kind!r}; expected one of {sorted(BASELINE_STAGES)}")
    with open_run(root, config, **storage_options(config)):
        c = config.model_dump(mode="json")
        stage_task("data")(root, c)
        got = stage_task(BASELINE_STAGES[kind])(root, c)
    return [str(u) for u in got] if isinstance(got, list) else [str(got)]


@flow(name="d3s-study", flow_run_name=_study_name, log_prints=True)
def study(root: str, config: StudySpec) -> str:
    """Run (or resume) a study; returns the report's URI."""
    plan = plan_study(config)  # every variant validated before anything runs
    spec = config.model_dump(mode="json")
    shared, base = at(root, SHARED), plan.shared
    c = base.model_dump(mode="json")
    with open_run(shared, base, **storage_options(base)):
        d = stage_task("data")(shared, c)
        t = stage_task("teachers")(shared, c, wait_for=[d])
        if base.dask is not None:
            stats_fanout(shared, base, [t])
        stage_task("stats")(shared, c, wait_for=[t])
    for cell in plan.cells:
        share_task(root, spec, cell.name)
        if cell.kind == "d3s":
            distill(root=at(root, cell.root), config=cell.config)
        else:
            baseline(root=at(root, cell.root), config=cell.config, kind=cell.kind)
    match_task(root, spec)
    return study_report_task(root, spec)
