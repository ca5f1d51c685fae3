"""The D3S flow: data -> teachers -> statistics -> synthesis -> labels -> validation (and the
optional stages the config enables), each a Prefect task around its stage runner, from the
stage table (tasks/stage_table.py). A new flow run with the same root and config reuses finished
stages (Prefect cache, and each runner's own check of the manifest) and resumes the unfinished
one from its checkpoint; so does `prefect flow-run retry` of a crashed run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.hygiene import crash_leftovers
from storage.config import RunConfig
from storage.manifest import CorruptArtifact, finding
from storage.run import open_run
from tasks.credentials import storage_options
from tasks.prefect_tasks import (
    check_task,
    forwarded_logs,
    repair_task,
    report_task,
    stage_task,
)
from tasks.stage_table import enabled, resolve


def _run_name() -> str:
    cfg = flow_run.parameters.get("config")
    cfg = cfg if isinstance(cfg, RunConfig) else RunConfig.model_validate(cfg or {})
    if cfg.name != RunConfig.model_fields["name"].default:
        return cfg.name  # e.g. distill-mnist5k-ipc10
    return f"d3s-{cfg.preset}-ipc{cfg.synthesis.ipc}"


@flow(name="d3s-distill", flow_run_name=_run_name, log_prints=True)
def distill(
    root: str = "runs/demo-mnist",
    config: RunConfig = RunConfig(),  # noqa: B008
    repair: bool = False,
) -> str:
    """Run (or resume) every D3S stage of one run, and the baselines the config asks for.
    Returns the URI of the distilled set's validation summary (its first protocol's).

    First every finished artifact is checked against the manifest: damage fails the run
    naming the files, or with `repair` is forgotten with what was computed from it, and
    recomputed."""
    # A retry of a crashed run (same flow run id): the earlier attempt's task runs that never
    # ended are marked Crashed and their progress artifacts superseded (flows/hygiene.py).
    crash_leftovers()
    c = config.model_dump(mode="json")
    # The flow holds the run's writer lock for its whole life (the tasks share it), and the
    # run exists before the first cache key is computed.
    with forwarded_logs(get_run_logger()):  # config.json restored in place: a warning
        run = open_run(root, config, **storage_options(config))
    with run:
        check = check_task(root, c, repair)
        repaired: set[str] = set()
        while True:
            try:
                return _stages(root, config, c, check)
            except CorruptArtifact as e:
                # What a stage's own check found (a full hash, a file it could not read): with
                # `repair`, forgotten with what was computed from it, and the stages run again
                # (finished ones return at once). Once per artifact: a second time is a fault.
                if not repair or e.rel is None or e.rel in repaired:
                    raise
                repaired.add(e.rel)
                repair_task(root, c, e.rel, finding(e))


def _stages(root: str, config: RunConfig, c: dict[str, Any], check: Any) -> str:
    """Every stage the config enables (tasks/stage_table.py), in the table's order, each after
    the stages it reads from (the first after the check); a stage with a Dask part runs that
    part on the cluster first. Then the report; the first summary's URI. `c`: the config as
    the tasks take it."""
    futures: dict[str, Any] = {"check": check}
    summaries = []
    for s in enabled(config):
        after = [futures[a] for a in s.after if a in futures] or [futures["check"]]
        if s.fanout is not None and config.dask is not None:
            resolve(s.fanout)(root, config, after)
        futures[s.name] = stage_task(s.name)(root, c, wait_for=after)
        if s.summary:
            summaries.append(futures[s.name])
    report_task(root, c)
    return summaries[0]
