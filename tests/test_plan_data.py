"""`d3s plan` reads the user's data (tasks/plan/data.py): class count, training images, channels
and image size from the run's data profile (the run root's, else measured as the run measures
it, writing nothing), never the preset's where the data says otherwise; the throughput table of
the config's device, shipped with the package; the plan's stage keys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from storage.config import parse_config
from storage.run import open_run
from tasks import plan as P
from tasks.stage_table import stages
from tasks.stages import open_data
from tasks.stages.recipe import data_profile

from .helpers import grey_tree, in21k_cfg, rgb_tree, tiny, unit_table


def odd_tree(root: Path, classes: int, per_class: int, size: tuple[int, int], mode: str) -> Path:
    """An ImageFolder tree of a shape no preset or other test has: `classes` folders of
    `per_class` training images (2 held out each) of `size` (width, height) in PIL `mode`."""
    rng = np.random.default_rng(5)
    w, h = size
    chans = 1 if mode == "L" else 3
    for split, n in (("train", per_class), ("val", 2)):
        for c in range(classes):
            d = root / split / f"kind_{c}"
            d.mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 256, size=(h, w, chans)[: 2 if chans == 1 else 3])
                Image.fromarray(px.astype(np.uint8), mode).save(d / f"{i}.png")
    return root


def config_file(tmp_path: Path, data: Path, preset: str = "tiny-imagenet", **extra) -> Path:
    raw = {
        "name": "odd",
        "preset": preset,
        "dataset": {
            "kind": "imagefolder",
            "path": str(data / "train"),
            "val_path": str(data / "val"),
        },
        **extra,
    }
    f = tmp_path / "odd.json"
    f.write_text(json.dumps(raw))
    return f


@pytest.mark.parametrize(
    "classes,per_class,size,mode,chw",
    [
        (7, 14, (36, 36), "L", "1x36x36"),  # greyscale, 98 training images
        (5, 21, (40, 24), "RGB", "3x24x24"),  # colour, non-square: the short side, no resizing
    ],
)
def test_plan_takes_counts_and_shape_from_an_odd_tree(
    tmp_path, capsys, classes, per_class, size, mode, chw
):
    data = odd_tree(tmp_path / "data", classes, per_class, size, mode)
    cfg = config_file(tmp_path, data)  # preset tiny-imagenet: 200 classes, 3x64x64, 100,000
    root = tmp_path / "run"
    assert main(["plan", str(cfg), "--root", str(root)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    n = classes * per_class
    ipc = parse_config(json.loads(cfg.read_text())).synthesis.ipc
    assert lines[0].endswith(
        f": {classes} classes x IPC {ipc} = {classes * ipc} images of {chw}"
    ), lines[0]
    assert lines[1] == f"training images: {n} (data: the images of the training split)"
    assert lines[2].startswith("data: measured now, as the run measures it")
    by_key = {line.split()[0]: line for line in lines[3:6]}
    assert f"[data: {classes} class folders under {data / 'train'}]" in by_key["classes"]
    assert by_key["channels"].split()[1] == chw[0]
    assert by_key["image"].split()[2] == chw.split("x")[-1]
    assert "[data: " in by_key["channels"] and "[data: " in by_key["image"]
    # the preset's values appear nowhere but in the warning about its recipe and the recipe's
    # line (the teachers' epochs made from its step count on its 100,000 images)
    rest = "\n".join(
        line
        for line in lines
        if "WARNING: teachers:" not in line and not line.startswith("recipe:")
    )
    assert "100,000" not in rest and "200 classes" not in rest and "64x64" not in rest
    assert f"{n} images, 1 batches" in out  # the stats row counts the data's images
    assert not root.exists()  # nothing written into the run root
    # the JSON says where each value came from
    assert main(["plan", str(cfg), "--root", str(root), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["shape"]["classes"] == classes
    assert plan["shape"]["image"] == [int(x) for x in chw.split("x")]
    assert plan["train_images"]["count"] == n == plan["counts"]["stats"]["images"]
    src = plan["shape"]["sources"]
    assert {k: v["from"] for k, v in src.items()} == dict.fromkeys(
        ("classes", "channels", "image_size", "train_images"), "data"
    )
    assert plan["data"]["read"] is True
    # --no-data: the preset's values, said to be the preset's
    assert main(["plan", str(cfg), "--no-data", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["shape"]["image"] == [3, 64, 64]
    assert plan["shape"]["sources"]["channels"]["from"] == "preset"
    assert plan["data"]["read"] is False


@pytest.mark.parametrize("make_tree", [rgb_tree, grey_tree])
def test_plan_equals_the_runs_profile_on_the_own_dataset_trees(tmp_path, make_tree):
    """test_own_dataset's trees (10 RGB classes of 32 px; 3 greyscale classes of varying
    sizes): the plan's classes, images, channels and size are the profile the run writes."""
    data = make_tree(tmp_path / "data")
    raw = tiny({"path": str(data / "train"), "val_path": str(data / "val")})
    cfg = parse_config(raw)
    planned = P.make_plan(cfg, root=str(tmp_path / "unused"))
    assert planned["data"]["where"].startswith("measured now")
    with open_run(str(tmp_path / "run"), cfg) as run:
        open_data(run)
        prof = data_profile(run)
    v = prof["values"]
    assert planned["shape"]["classes"] == v["num_classes"]
    assert planned["shape"]["image"] == [v["channels"], v["image_size"], v["image_size"]]
    assert planned["train_images"]["count"] == prof["train_images"]
    assert planned["shape"]["sources"]["image_size"]["how"] == prof["sources"]["image_size"]


def test_plan_reads_the_run_roots_profile(tmp_path):
    data = odd_tree(tmp_path / "data", 3, 4, (20, 20), "L")
    raw = tiny({"path": str(data / "train"), "val_path": str(data / "val")})
    cfg = parse_config(raw)
    root = tmp_path / "run"
    with open_run(str(root), cfg) as run:
        open_data(run)  # written by the run: 12 images of 1x20x20
    # the tree changes afterwards: the run root's profile is what the run uses, and is read
    for i in range(4, 9):
        Image.new("L", (20, 20)).save(data / "train" / "kind_0" / f"{i}.png")
    planned = P.make_plan(cfg, root=str(root))
    assert planned["data"]["where"] == f"the run's {root / 'dataset' / 'profile.json'}"
    assert planned["train_images"]["count"] == 12
    assert planned["shape"]["image"] == [1, 20, 20]
    # another root (no run there): measured afresh
    assert P.make_plan(cfg, root=str(tmp_path / "other"))["train_images"]["count"] == 17
    # a run root of another dataset: its profile is not this data's
    other = parse_config({**raw, "dataset": {**raw["dataset"], "profile_samples": 5}})
    assert P.make_plan(other, root=str(root))["train_images"]["count"] == 17


def test_cuda_without_a_gpu_table_says_so(tmp_path, monkeypatch):
    """The hours of a cuda run are not the CPU table's (1.3 M hours at ImageNet-21K); the
    table of the config's device kind is picked where there is one."""
    tables = tmp_path / "throughput"
    tables.mkdir()
    cpu = P.table_path("cpu")
    (tables / "cpu.json").write_text(cpu.read_text())
    monkeypatch.setattr("tasks.plan.hours.table_path", lambda device: tables / f"{device}.json")
    plan = P.make_plan(in21k_cfg(10))
    h = plan["hours"]
    assert h["total"] is None and h["missing"] == "no GPU table: run bench/gpu_smoke.sh on a GPU"
    assert all(v is None for k, v in h["stages"].items() if k != "baseline_images")
    assert plan["throughput"]["file"] is None
    # the host baseline still comes from the CPU table's measured process
    assert (
        plan["memory"]["baseline_rss_bytes"]
        == json.loads(cpu.read_text())["process_rss_bytes"]["after_work"]
    )
    text = P.format_plan(plan)
    total = next(line for line in text.splitlines() if line.startswith("total"))
    assert total.endswith("no GPU table: run bench/gpu_smoke.sh on a GPU")
    synthesis = next(line for line in text.splitlines() if line.startswith("synthesis "))
    assert synthesis.endswith("no GPU table")
    assert "ESTIMATE" not in text
    # a cuda table beside it: picked for the cuda config
    unit = json.loads(unit_table(tmp_path, 1e12).read_text())
    (tables / "cuda.json").write_text(json.dumps({**unit, "device": "cuda"}))
    plan = P.make_plan(in21k_cfg(10))
    assert plan["throughput"]["file"] == str(tables / "cuda.json")
    assert plan["hours"]["total"] is not None and "missing" not in plan["hours"]
    assert "WARNING: this run is on" not in P.format_plan(plan)


def test_throughput_tables_are_package_data():
    path = P.table_path("cpu")
    assert path.is_file() and path.parent.parent == Path(P.__file__).parent
    assert json.loads(path.read_text())["device"] == "cpu"
    assert P.table_path("cuda:1").name == "cuda.json"
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"tasks.plan" = ["throughput/*.json"]' in pyproject


def test_plan_rows_follow_the_stage_table():
    """Every stage of the table the config enables is planned, in the table's order: its rows
    of the planner's model, or one "not estimated" row (the data stage)."""
    raw = json.loads((Path(__file__).resolve().parents[1] / "configs/demo-mnist.json").read_text())
    raw["validation"] |= {"protocols": ["soft", "hard"], "coresets": ["herding"], "full_data": True}
    plan = P.make_plan(parse_config(raw))
    want = [k for s in stages() for k in (s.plan or (s.name,))]
    assert [r["stage"] for r in plan["stages"]] == want
    assert set(plan["hours"]["stages"]) <= set(P.PLAN_STAGES)
    assert plan["totals"]["not_estimated"] == ["data"]
    runs = {v["run_stage"] for v in P.PLAN_STAGES.values()}
    assert runs == {s.name for s in stages() if s.plan}
