"""The flow's dashboards in a real browser: a live `prefect server start`, one SMALL flow run
against it, then headless Chromium (tools/ui_check.py) opens the flow run page, its Artifacts
tab and every keyed artifact's page in both bundled UIs (v1 at `/`, v2 at `/v2`) and the test
asserts on the rendered DOM: the run's name and state, the artifacts listed, the tables' rows,
the progress artifacts at 100 %, and that the summary's data: PNG decoded (naturalWidth > 0).

Screenshots land in a tmp folder; with UI_SHOTS_DIR=/some/dir they are also copied there.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .configs import SMALL
from .live_server import REPO, live_prefect_server

# Opt-in (needs Chromium: apt-get install chromium): pytest -m external tests/test_ui_browser.py
pytestmark = [pytest.mark.slow, pytest.mark.external, pytest.mark.timeout(900)]

RUN_NAME = "ui-browser"
KEYS = ("summary", "accuracy", "synthesis-layer-kl")


def _ui_check():
    spec = importlib.util.spec_from_file_location("ui_check", REPO / "tools" / "ui_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("ui_check", mod)
    spec.loader.exec_module(mod)
    return mod


ui_check = _ui_check()


def _run_flow(server, root) -> str:
    """The SMALL flow in a subprocess whose Prefect client talks to the live server."""
    code = (
        "import json, sys\n"
        "from flows.distill import distill\n"
        "from storage.config import parse_config\n"
        f"cfg = parse_config({{**json.loads(sys.argv[1]), 'name': {RUN_NAME!r}}})\n"
        "state = distill(root=sys.argv[2], config=cfg, return_state=True)\n"
        "print('FLOW_RUN_ID', state.state_details.flow_run_id, state.name)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(SMALL), str(root)],
        env=server.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("FLOW_RUN_ID"))
    _, flow_run_id, state = line.split()
    assert state == "Completed", out.stderr[-5000:]
    return flow_run_id


def _find_flow_run(server) -> dict:
    """The one flow run of d3s-distill on the server, found through the Prefect API."""
    runs = ui_check._api(
        server.api_url,
        "/flow_runs/filter",
        {"flows": {"name": {"any_": ["d3s-distill"]}}, "flow_runs": {"name": {"any_": [RUN_NAME]}}},
    )
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """The pages of one flow run, rendered by Chromium: {page name: ui_check.Page}."""
    if not ui_check.find_chromium():
        pytest.skip(
            "no Chromium binary (looked for $CHROMIUM, "
            + ", ".join(ui_check.CHROMIUM_NAMES)
            + "); apt-get install chromium"
        )
    tmp = tmp_path_factory.mktemp("ui")
    with live_prefect_server(tmp) as server:
        printed_id = _run_flow(server, tmp / "run")
        run = _find_flow_run(server)
        assert run["id"] == printed_id
        assert run["state"]["name"] == "Completed"
        arts = ui_check._api(
            server.api_url,
            "/artifacts/filter",
            {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}},
        )
        pages = ui_check.check(server.url, run["id"], tmp / "shots", timeout=90)
    if os.environ.get("UI_SHOTS_DIR"):
        shutil.copytree(tmp / "shots", os.environ["UI_SHOTS_DIR"], dirs_exist_ok=True)
    return {"run": run, "artifacts": arts, "pages": pages, "dir": tmp / "shots"}


UIS = ("v1", "v2")
PAGE_ROWS = 10


def _png_size(path) -> tuple[int, int]:
    data = Path(path).read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_every_page_rendered_and_was_screenshot(shots):
    for name, page in shots["pages"].items():
        assert page.ready, f"{name} never showed {page.wait_text}: {page.url}\n{page.text[:2000]}"
        width, height = _png_size(page.png)
        assert width >= 1000 and height >= 600, (name, width, height)
        assert "<html" in Path(page.html).read_text()
    assert (shots["dir"] / "report.json").exists()


@pytest.mark.parametrize("ui", UIS)
def test_flow_run_page_shows_name_and_completed(shots, ui):
    page = shots["pages"][f"{ui}-flow-run"]
    assert RUN_NAME in page.text
    assert "Completed" in page.text
    assert "d3s-distill" in page.text  # the flow's name, under the run's


@pytest.mark.parametrize("ui", UIS)
def test_artifacts_tab_lists_keys_and_progress(shots, ui):
    page = shots["pages"][f"{ui}-flow-run-artifacts"]
    lines = {ln.strip() for ln in page.text.splitlines()}
    assert set(KEYS) <= lines, lines
    progress = [a for a in shots["artifacts"] if a["type"] == "progress"]
    assert len(progress) >= 5
    for a in progress:  # each progress artifact is a card with its last description
        assert a["description"] in lines
    assert page.text.lower().count("progress") >= len(progress)


def _data_images(page) -> list[dict]:
    return [i for i in page.images if i["src"].startswith("data:image/png;base64,")]


@pytest.mark.parametrize("ui", UIS)
def test_summary_markdown_renders_its_data_png(shots, ui):
    summary = next(a for a in shots["artifacts"] if a.get("key") == "summary")
    page = shots["pages"][f"{ui}-artifact-summary"]
    assert RUN_NAME in page.text
    html = Path(page.html).read_text()
    assert "<img" in html and 'src="data:image/png;base64,' in html
    imgs = _data_images(page)
    # every image of the markdown is an <img> in the page, decoded and laid out
    assert len(imgs) == summary["data"].count("data:image/png;base64,") >= 1, page.images
    for img in imgs:
        assert img["complete"] and img["natural_width"] > 0 and img["natural_height"] > 0, img
        assert img["width"] > 0 and img["height"] > 0, img


@pytest.mark.parametrize("ui", UIS)
def test_every_markdown_image_loads(shots, ui):
    """Every keyed markdown artifact with data: images (the summary, loss curves): all decode."""
    marked = [a for a in shots["artifacts"] if a.get("key") and a["type"] == "markdown"]
    for a in marked:
        n = a["data"].count("data:image/png;base64,")
        imgs = _data_images(shots["pages"][f"{ui}-artifact-{a['key']}"])
        assert len(imgs) == n and all(i["natural_width"] > 0 for i in imgs), (a["key"], imgs)


@pytest.mark.parametrize("ui", UIS)
def test_tables_render_every_row(shots, ui):
    by_key = {a["key"]: a for a in shots["artifacts"] if a.get("key")}
    for key in ("accuracy", "synthesis-layer-kl"):
        data = json.loads(by_key[key]["data"])
        page = shots["pages"][f"{ui}-artifact-{key}"]
        assert len(page.tables) == 1, (key, page.tables)
        table = page.tables[0]
        assert list(data[0]) == table["headers"], (key, table["headers"])
        shown = data[:PAGE_ROWS] if ui == "v2" else data  # v2 pages tables by 10 rows
        assert len(table["rows"]) == len(shown), (key, table["rows"])
        assert [r[0] for r in table["rows"]] == [str(row[table["headers"][0]]) for row in shown]
    accuracy = shots["pages"][f"{ui}-artifact-accuracy"].tables[0]
    assert {"teacher 1", "teacher 2", "student 1"} <= {r[0] for r in accuracy["rows"]}


@pytest.mark.parametrize("ui", UIS)
def test_progress_artifact_shows_100_percent(shots, ui):
    task_page = shots["pages"][f"{ui}-task-run-artifacts"]
    assert "synthesis" in task_page.text and "Completed" in task_page.text
    assert "progress" in task_page.text.lower()
    page = shots["pages"][f"{ui}-artifact-progress"]
    assert "Progress: 100%" in page.text
