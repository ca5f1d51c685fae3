"""The planner's rows: each stage of the stage table (tasks/stage_table.py) names its rows of
the planner's model (`Stage.plan`), in the flow's order; here, the artifacts each row keeps. A
stage with no rows is planned as "not estimated" (tasks/plan/build.py)."""

from __future__ import annotations

from typing import TypedDict

from tasks.stage_table import stages


class PlanStage(TypedDict):
    artifacts: list[str]
    run_stage: str


# The artifacts (keys of `disk.disk`) each row of the planner's model keeps. Which rows a stage
# of the run has, and their order, come from the stage table (its `plan` field).
ROW_ARTIFACTS: dict[str, list[str]] = {
    "teachers": ["teacher_weights"],
    "stats": ["stats_zarr"],
    "synthesis": ["synthesis_images", "isu_state", "synthesis_commit_records"],
    "labels": ["labels"],
    "validation": ["student_weights"],
    "validation_hard": ["student_weights_hard"],
    "baseline_images": ["baseline_images"],
    "baseline_labels": ["baseline_labels"],
    "baseline_validation": ["baseline_student_weights"],
    "baseline_validation_hard": ["baseline_student_weights_hard"],
    "coresets": ["coreset_images"],
    "coreset_labels": ["coreset_labels"],
    "coreset_validation": ["coreset_student_weights"],
    "coreset_validation_hard": ["coreset_student_weights_hard"],
    "full_data": ["full_data_student_weights"],
}


def plan_stages() -> dict[str, PlanStage]:
    """Every row of the planner's model, in the stage table's order: its artifacts and the
    run's stage that does its work."""
    return {
        key: {"artifacts": ROW_ARTIFACTS[key], "run_stage": s.name}
        for s in stages()
        for key in s.plan
    }


PLAN_STAGES = plan_stages()  # the table as it ships
STAGE_DISK = {k: v["artifacts"] for k, v in PLAN_STAGES.items()}


def stage_order(stage: str) -> int:
    """Position of a plan stage key in the flow's order."""
    return list(plan_stages()).index(stage)


def of_run_stage(run_stage: str) -> list[str]:
    """The plan's stage keys that a run's stage (e.g. "baseline") covers, in order."""
    return [k for k, v in plan_stages().items() if v["run_stage"] == run_stage]
