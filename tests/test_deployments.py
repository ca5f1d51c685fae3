"""The deployment file loads: every entrypoint is the flow, every parameter set passes the
flow's own parameter validation (the schema a deployment enforces), schedules parse."""

from pathlib import Path

import pytest
import yaml
from prefect.flows import load_flow_from_entrypoint

REPO = Path(__file__).resolve().parents[1]
SPEC = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())


@pytest.mark.parametrize("dep", SPEC["deployments"], ids=lambda d: d["name"])
def test_deployment_loads_and_validates(dep, monkeypatch):
    monkeypatch.chdir(REPO)
    flow = load_flow_from_entrypoint(dep["entrypoint"])
    assert flow.name == "d3s-distill"
    params = flow.validate_parameters(dep["parameters"])
    assert params["config"].preset in dep["name"] or params["config"].preset == "demo-mnist"
    assert dep["work_pool"]["name"] == "d3s-gpu"
    assert dep["work_pool"]["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"] in {"0", "1"}
    for sched in dep.get("schedules", []):
        from prefect.client.schemas.schedules import CronSchedule

        CronSchedule(cron=sched["cron"], timezone=sched["timezone"])


def test_bad_parameters_are_rejected_by_the_flow_schema():
    flow = load_flow_from_entrypoint(str(REPO / "flows" / "distill.py") + ":distill")
    bad = {"root": "x", "config": {"preset": "demo-mnist", "synthesis": {"ipcc": 3}}}
    with pytest.raises(Exception, match="ipcc"):
        flow.validate_parameters(bad)


def test_one_scheduled_deployment():
    assert sum(1 for d in SPEC["deployments"] if d.get("schedules")) >= 1
