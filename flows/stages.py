"""One flow per stage of the stage table (tasks/stage_table.py), for running a stage alone from
Prefect: `d3s-data`, `d3s-teachers`, `d3s-stats`, `d3s-synthesis`, `d3s-labels`,
`d3s-validation`, and the optional `d3s-validation-hard`, `d3s-baseline`, `d3s-coresets`,
`d3s-full-data`. Each takes the same parameters as the whole flow, holds the run's lock and runs
the stage's task, which reuses a finished stage and resumes an unfinished one. A stage whose
inputs are missing fails naming the missing file.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from prefect import Flow, flow

from storage.config import RunConfig
from storage.run import open_run
from tasks.credentials import storage_options
from tasks.prefect_tasks import stage_task
from tasks.stage_table import stage, stages


@cache
def stage_flow(name: str) -> Flow[..., Any]:
    """The flow `d3s-<name>` running stage `name` alone (made on first use)."""
    s = stage(name)

    def run_stage(root: str, config: RunConfig) -> Any:
        with open_run(root, config, **storage_options(config)):
            return stage_task(name)(root, config.model_dump(mode="json"))

    run_stage.__name__ = f"{name.replace('-', '_')}_flow"
    run_stage.__doc__ = f"Run (or resume) the {name} stage of one D3S run alone: {s.doc}."
    return flow(name=f"d3s-{name}", flow_run_name=f"{name}-{{config.name}}")(run_stage)


def __getattr__(attr: str) -> Flow[..., Any]:
    """`flows.stages.<stage>_flow` (e.g. teachers_flow, validation_hard_flow): the entrypoints
    a deployment names (deployments/prefect.yaml)."""
    names = {f"{s.name.replace('-', '_')}_flow": s.name for s in stages()}
    if attr in names:
        return stage_flow(names[attr])
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
