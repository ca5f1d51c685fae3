"""The deployment files load: every entrypoint is the flow, every parameter set passes
`storage.config.parse_config` and the flow's own parameter validation (the schema a deployment
enforces), schedules parse and are inactive. `deployments/prefect.yaml` (what `prefect deploy
--all` installs) holds only the demo; the GPU presets reading /data are in the opt-in
`deployments/presets.yaml`. The `--params` examples in the docs are complete and valid."""

import json
import re
from pathlib import Path

import pytest
import yaml
from prefect.flows import load_flow_from_entrypoint

from storage.config import parse_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FILE = REPO / "deployments" / "prefect.yaml"
PRESETS_FILE = REPO / "deployments" / "presets.yaml"
DEFAULT = yaml.safe_load(DEFAULT_FILE.read_text())
PRESETS = yaml.safe_load(PRESETS_FILE.read_text())
ALL = [("prefect.yaml", d) for d in DEFAULT["deployments"]] + [
    ("presets.yaml", d) for d in PRESETS["deployments"]
]
PRESET_NAMES = {"tiny-imagenet-ipc50", "imagenet-1k-ipc10", "imagenet-21k-ipc10"}


@pytest.fixture(scope="module")
def flow():
    return load_flow_from_entrypoint(str(REPO / "flows" / "distill.py") + ":distill")


@pytest.mark.parametrize("where,dep", ALL, ids=lambda x: x if isinstance(x, str) else x["name"])
def test_deployment_loads_and_validates(where, dep, flow, monkeypatch):
    monkeypatch.chdir(REPO)
    assert dep["entrypoint"] == "flows/distill.py:distill"
    assert load_flow_from_entrypoint(dep["entrypoint"]).name == "d3s-distill"
    cfg = parse_config(dep["parameters"]["config"], source=f"{where}:{dep['name']}")
    params = flow.validate_parameters(dep["parameters"])
    assert params["config"].preset == cfg.preset
    assert cfg.preset in dep["name"] or cfg.preset == "demo-mnist"
    assert isinstance(dep["parameters"]["root"], str) and dep["parameters"]["root"]
    pool = dep["work_pool"]
    assert pool["name"] == "d3s-gpu"
    assert pool["work_queue_name"] == f"gpu-{pool['job_variables']['env']['CUDA_VISIBLE_DEVICES']}"
    # Heartbeats every 30 s: what the zombie automation (about 2 minutes) relies on.
    assert pool["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"


@pytest.mark.parametrize("where,dep", ALL, ids=lambda x: x if isinstance(x, str) else x["name"])
def test_schedules_parse_and_are_inactive(where, dep):
    """No deployment runs by itself after `prefect deploy`: every schedule says active: false,
    and Prefect's own prefect.yaml reader turns it into an inactive DeploymentScheduleCreate."""
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.client.schemas.actions import DeploymentScheduleCreate

    for sched in dep.get("schedules") or []:
        assert sched.get("active") is False, f"{where}:{dep['name']}: schedule must be opt-in"
        obj = DeploymentScheduleCreate(**_schedule_config_to_deployment_schedule(sched))
        assert obj.active is False
        assert obj.schedule.cron == sched["cron"]


def test_default_file_is_only_the_demo():
    """`prefect deploy --prefect-file deployments/prefect.yaml --all` installs the demo only:
    nothing on a GPU, nothing reading /data or /weights."""
    assert [d["name"] for d in DEFAULT["deployments"]] == ["demo-mnist"]
    (demo,) = DEFAULT["deployments"]
    assert parse_config(demo["parameters"]["config"]).preset == "demo-mnist"
    assert "/data" not in DEFAULT_FILE.read_text().split("\nname:", 1)[1]
    assert "/weights" not in DEFAULT_FILE.read_text().split("\nname:", 1)[1]
    # The nightly schedule is there to turn on, but off.
    assert [s["cron"] for s in demo["schedules"]] == ["0 2 * * *"]
    assert all(s["active"] is False for s in demo["schedules"])


def test_presets_only_in_the_opt_in_file():
    names = {d["name"] for d in PRESETS["deployments"]}
    assert names == PRESET_NAMES
    assert not names & {d["name"] for d in DEFAULT["deployments"]}
    for dep in PRESETS["deployments"]:
        assert not dep.get("schedules"), dep["name"]
        assert parse_config(dep["parameters"]["config"]).device == "cuda"


@pytest.mark.parametrize("spec", [DEFAULT, PRESETS], ids=["prefect.yaml", "presets.yaml"])
def test_edited_values_come_from_definitions(spec):
    """Roots and dataset paths are YAML anchors in `definitions`: edited in one place."""
    defined = [v for v in spec["definitions"].values() if not isinstance(v, dict)]
    defined_dicts = [v for v in spec["definitions"].values() if isinstance(v, dict)]
    for dep in spec["deployments"]:
        p = dep["parameters"]
        assert p["root"] in defined, dep["name"]
        ds = p["config"]["dataset"]
        for key in ("path", "val_path"):
            if key in ds:
                assert ds[key] in defined, (dep["name"], key)
        init = p["config"].get("teachers", {}).get("init_from")
        if init is not None:
            assert init in defined, dep["name"]
        if spec is DEFAULT:
            assert p["config"] in defined_dicts


def test_bad_parameters_are_rejected_by_the_flow_schema(flow):
    bad = {"root": "x", "config": {"preset": "demo-mnist", "synthesis": {"ipcc": 3}}}
    with pytest.raises(Exception, match="ipcc"):
        flow.validate_parameters(bad)


def _params_examples():
    found = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for m in re.finditer(r"--params '([^']*)'", doc.read_text()):
            found.append((doc.relative_to(REPO).as_posix(), m.group(1)))
    return found


def test_docs_have_a_params_example():
    assert any(doc == "docs/prefect.md" for doc, _ in _params_examples())


@pytest.mark.parametrize("doc,text", _params_examples(), ids=lambda x: x[:40])
def test_docs_params_examples_are_complete(doc, text, flow):
    """Every `prefect deployment run ... --params '...'` in the docs runs as written: JSON with
    `root` and a whole `config` that parses and passes the flow's schema."""
    params = json.loads(text)
    assert set(params) == {"root", "config"}, doc
    parse_config(params["config"], source=doc)
    flow.validate_parameters(params)
