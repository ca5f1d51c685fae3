"""The whole D3S flow under a real (ephemeral) Prefect server, with an isolated PREFECT_HOME."""

import json

import pytest

from storage.config import parse_config

from .configs import SMALL


@pytest.fixture(scope="module")
def flow_run(prefect_server, tmp_path_factory):
    """One flow run of SMALL from scratch: (its root's parent, its config, its final state)."""
    from flows.distill import distill

    tmp_path = tmp_path_factory.mktemp("flow")
    cfg = parse_config({**SMALL, "name": "flowtest"})
    state = distill(root=str(tmp_path / "run"), config=cfg, return_state=True)
    return tmp_path, cfg, state


def test_flow_runs_then_reuses_finished_stages(flow_run, monkeypatch):
    from flows.distill import distill

    tmp_path, cfg, state = flow_run
    root = str(tmp_path / "run")
    assert state.is_completed()
    summary = json.loads((tmp_path / "run" / "validation" / "summary.json").read_text())
    assert summary["students"] == 1
    manifest = (tmp_path / "run" / "manifest.json").read_text()
    match_file = tmp_path / "run" / "report" / "match.json"
    match = json.loads(match_file.read_text())
    assert set(match) == {"distilled"} and len(match["distilled"]["teachers"]) == 2

    def measure_again(*a, **k):
        raise AssertionError("the distribution match was measured again on the same images")

    monkeypatch.setattr("tasks.stages.match.match_images", measure_again)
    # A second flow run with the same config and root: every stage is reused, nothing rewritten.
    again = distill(root=root, config=cfg, return_state=True)
    assert again.is_completed()
    assert (tmp_path / "run" / "manifest.json").read_text() == manifest
    # The distribution match is kept with its images' hash, not measured again.
    assert json.loads(match_file.read_text()) == match
    from prefect.client.orchestration import get_client

    async def task_states():
        async with get_client() as client:
            runs = await client.read_task_runs()
            flow_run_id = again.state_details.flow_run_id
            return [(r.name, r.state.name) for r in runs if r.flow_run_id == flow_run_id]

    import asyncio

    states = dict(asyncio.run(task_states()))
    # Every stage is reused; the artifacts are checked first and the report (cheap, not
    # cached) is rewritten.
    assert states == {
        "check-artifacts": "Completed",
        "data": "Completed",  # not cached: it reads the profile and the index and returns
        **{s: "Cached" for s in ("teachers", "stats", "synthesis", "labels", "validation")},
        "report": "Completed",
    }


def test_flow_publishes_tables_progress_and_image_grid(flow_run):
    """What the first flow run (every stage computed) published."""
    import asyncio

    from prefect.client.orchestration import get_client

    tmp_path, _, state = flow_run
    flow_run_id = state.state_details.flow_run_id

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts()

    mine = [a for a in asyncio.run(artifacts()) if a.flow_run_id == flow_run_id]
    by_key = {a.key: a for a in mine if a.key}
    assert {"accuracy", "validation", "summary", "synthesis-layer-kl", "loss-curves"} <= set(by_key)
    # The report, as written beside the artifacts, with both images inline.
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "## Accuracy" in report and "![loss curves](curves.png)" in report
    assert "## Distribution match" in report and "| distilled (D3S) | " in report
    assert by_key["summary"].data.count("data:image/png;base64,") == 2
    assert "data:image/png;base64," in by_key["loss-curves"].data
    summary = json.loads((tmp_path / "run" / "validation" / "summary.json").read_text())
    validation = json.loads(by_key["validation"].data)
    assert validation[0]["mean top1 %"] == round(100 * summary["mean"], 2)
    progress = [a for a in mine if a.type == "progress"]
    assert len(progress) >= 5 and all(a.data == 100.0 for a in progress)
