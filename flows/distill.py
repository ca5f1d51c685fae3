"""The D3S flow: teachers -> statistics -> synthesis -> labels -> validation, each a Prefect
task around its stage runner. A new flow run with the same root and config reuses finished
stages (Prefect cache, and each runner's own check of the manifest) and resumes the unfinished
one from its checkpoint; so does `prefect flow-run retry` of a crashed run.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.hygiene import crash_leftovers
from storage.config import RunConfig
from storage.run import open_run
from tasks.credentials import storage_options
from tasks.dask_stages import (
    label_epochs_flow,
    labels_plan_task,
    on_dask,
    stats_plan_task,
    stats_shards_flow,
)
from tasks.prefect_tasks import (
    baseline_task,
    check_task,
    coresets_task,
    full_data_task,
    labels_task,
    report_task,
    stats_task,
    synthesis_task,
    teachers_task,
    validation_hard_task,
    validation_task,
)


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
    with open_run(root, config, **storage_options(config)):
        checked = check_task(root, c, repair)
        t = teachers_task(root, c, wait_for=[checked])
        if config.dask is not None:  # statistics shards on the Dask cluster, merged below
            todo = stats_plan_task(root, c, wait_for=[t])
            if todo:
                on_dask(stats_shards_flow, config.dask)(root, c, todo)
        s = stats_task(root, c, wait_for=[t])
        syn = synthesis_task(root, c, wait_for=[s])
        v = config.validation
        summaries = []
        if "soft" in v.protocols:  # the paper's protocol: ensemble labels, then KD students
            if config.dask is not None:  # label epochs on the Dask cluster, recorded below
                epochs = labels_plan_task(root, c, wait_for=[syn])
                if epochs:
                    on_dask(label_epochs_flow, config.dask)(root, c, epochs)
            lab = labels_task(root, c, wait_for=[syn])
            summaries.append(validation_task(root, c, wait_for=[lab]))
        if "hard" in v.protocols:  # the same students on the class labels
            summaries.append(validation_hard_task(root, c, wait_for=[syn]))
        # The baselines need only the teachers (or not even them): any order after them.
        if v.random_real_baseline:
            baseline_task(root, c, wait_for=[t])
        if v.coresets:
            coresets_task(root, c, wait_for=[t])
        if v.full_data:
            full_data_task(root, c, wait_for=[t])
        report_task(root, c)
        summary_uri = summaries[0]
    return summary_uri
