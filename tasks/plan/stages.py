"""The planner's stages: its one table of stage keys.

Every row of `d3s plan` is one of these keys, in the flow's order (the table's rows and the
hours' keys follow it). `artifacts` are the keys of `disk.disk`'s artifacts the stage keeps;
`run_stage` is the stage of the run (the CLI's subcommand, tasks/stages STAGES/EXTRA_STAGES)
that does the work, so that a single stage table (tasks/stage_table.py, in the making) can be
the source of these keys later: this dict is the only place that lists them.
"""

from __future__ import annotations

from typing import TypedDict


class PlanStage(TypedDict):
    artifacts: list[str]
    run_stage: str


PLAN_STAGES: dict[str, PlanStage] = {
    "teachers": {"artifacts": ["teacher_weights"], "run_stage": "teachers"},
    "stats": {"artifacts": ["stats_zarr"], "run_stage": "stats"},
    "synthesis": {
        "artifacts": ["synthesis_images", "isu_state", "synthesis_commit_records"],
        "run_stage": "synthesis",
    },
    "labels": {"artifacts": ["labels"], "run_stage": "labels"},
    "validation": {"artifacts": ["student_weights"], "run_stage": "validation"},
    "validation_hard": {"artifacts": ["student_weights_hard"], "run_stage": "validation-hard"},
    "baseline_images": {"artifacts": ["baseline_images"], "run_stage": "baseline"},
    "baseline_labels": {"artifacts": ["baseline_labels"], "run_stage": "baseline"},
    "baseline_validation": {"artifacts": ["baseline_student_weights"], "run_stage": "baseline"},
    "baseline_validation_hard": {
        "artifacts": ["baseline_student_weights_hard"],
        "run_stage": "baseline",
    },
    "coresets": {"artifacts": ["coreset_images"], "run_stage": "coresets"},
    "coreset_labels": {"artifacts": ["coreset_labels"], "run_stage": "coresets"},
    "coreset_validation": {"artifacts": ["coreset_student_weights"], "run_stage": "coresets"},
    "coreset_validation_hard": {
        "artifacts": ["coreset_student_weights_hard"],
        "run_stage": "coresets",
    },
    "full_data": {"artifacts": ["full_data_student_weights"], "run_stage": "full-data"},
}

# stage key -> the artifacts it keeps (the name the planner used before PLAN_STAGES)
STAGE_DISK = {k: v["artifacts"] for k, v in PLAN_STAGES.items()}


def stage_order(stage: str) -> int:
    """Position of a plan stage key in the flow's order."""
    return list(PLAN_STAGES).index(stage)


def of_run_stage(run_stage: str) -> list[str]:
    """The plan's stage keys that a run's stage (e.g. "baseline") covers, in order."""
    return [k for k, v in PLAN_STAGES.items() if v["run_stage"] == run_stage]
