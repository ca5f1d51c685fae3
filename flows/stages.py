"""One flow per stage, for running a stage alone from Prefect (`d3s-teachers`, `d3s-stats`,
`d3s-synthesis`, `d3s-labels`, `d3s-validation`, and the optional `d3s-validation-hard`,
`d3s-baseline`, `d3s-coresets`, `d3s-full-data`). Each takes the same parameters as the
whole flow, holds the run's lock and runs the stage's task, which reuses a finished stage and
resumes an unfinished one. A stage whose inputs are missing fails naming the missing file.
"""

from __future__ import annotations

from prefect import flow

from storage.config import RunConfig
from storage.run import open_run
from tasks.credentials import storage_options
from tasks.prefect_tasks import (
    baseline_task,
    coresets_task,
    full_data_task,
    labels_task,
    stats_task,
    synthesis_task,
    teachers_task,
    validation_hard_task,
    validation_task,
)


def _stage_flow(stage: str, stage_task):
    def run_stage(root: str, config: RunConfig) -> str:
        with open_run(root, config, **storage_options(config)):
            return stage_task(root, config.model_dump(mode="json"))

    run_stage.__name__ = f"{stage.replace('-', '_')}_flow"
    run_stage.__doc__ = f"Run (or resume) the {stage} stage of one D3S run alone."
    return flow(run_stage, name=f"d3s-{stage}", flow_run_name=f"{stage}-{{config.name}}")


teachers_flow = _stage_flow("teachers", teachers_task)
stats_flow = _stage_flow("stats", stats_task)
synthesis_flow = _stage_flow("synthesis", synthesis_task)
labels_flow = _stage_flow("labels", labels_task)
validation_flow = _stage_flow("validation", validation_task)
validation_hard_flow = _stage_flow("validation-hard", validation_hard_task)
baseline_flow = _stage_flow("baseline", baseline_task)
coresets_flow = _stage_flow("coresets", coresets_task)
full_data_flow = _stage_flow("full-data", full_data_task)
