"""Damaged artifacts are never hidden: `d3s verify` finds them, `d3s repair` forgets them and
what was computed from them, the flow refuses to reuse them (Prefect's cache included) and,
with --repair, recomputes exactly that; a copied root is checked as itself."""

import hashlib
import json
import shutil

import pytest

from flows.cli import main
from storage.config import parse_config
from storage.fs import RunFS
from storage.integrity import check, dependents, plan_repair, repair
from storage.manifest import Manifest
from storage.run import SYN_IMAGES, labels_epoch, open_run, syn_commit, teacher_weights
from tasks.stages import STAGES

from .configs import SMALL
from .helpers import flip_byte_keeping_stat, run_files

# Two synthesis batches, so a damaged second batch can be redone alone.
CONFIG = {
    **SMALL,
    "name": "integrity",
    "synthesis": {
        "ipc": 2,
        "batch_size": 10,
        "checkpoint_every": 4,
        "checkpoint_seconds": 0,
        "params": {"iterations": 4},
    },
}


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(root):
    """{relative path: sha256} of every file of a run except the manifest (and its previous
    generation) and the lock."""
    return run_files(root)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity") / "run"
    with open_run(root, parse_config(CONFIG)) as run:
        for fn in STAGES.values():
            fn(run)
    return root


@pytest.fixture
def run_copy(finished, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(finished, dst)
    return dst


def run_stages(root):
    with open_run(root, parse_config(CONFIG)) as run:
        for fn in STAGES.values():
            fn(run)


def test_verify_finds_truncation_quickly_and_bit_rot_in_full(run_copy, capsys):
    assert main(["verify", str(run_copy)]) == 0
    assert main(["verify", str(run_copy), "--quick"]) == 0
    flip_byte_keeping_stat(run_copy / teacher_weights(0), offset=200)
    assert main(["verify", str(run_copy), "--quick"]) == 0  # size and mtime as recorded
    assert main(["verify", str(run_copy)]) == 1
    out = capsys.readouterr()
    assert "teachers/teacher_0.safetensors" in out.out and "DAMAGED" in out.out
    assert f"d3s repair {run_copy}" in out.err
    shard = run_copy / labels_epoch(1)
    shard.write_bytes(shard.read_bytes()[:-100])
    assert main(["verify", str(run_copy), "--quick"]) == 1
    assert "labels/epoch=1/part-0.parquet" in capsys.readouterr().out


def test_repair_forgets_a_damaged_label_epoch_and_the_students_then_recomputes_them(
    run_copy, finished, capsys
):
    before = files(finished)
    shard = run_copy / labels_epoch(1)
    shard.write_bytes(shard.read_bytes()[:-100])
    assert main(["repair", str(run_copy), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would forget labels/epoch=1/part-0.parquet" in out
    assert "would forget validation/summary.json" in out
    assert "labels/epoch=0" not in out and "synthesis" not in out
    assert shard.exists()  # a dry run changes nothing
    assert main(["repair", str(run_copy)]) == 0
    m = Manifest(RunFS(run_copy))
    assert not m.is_recorded(labels_epoch(1)) and not m.is_recorded("validation/summary.json")
    assert m.is_recorded(labels_epoch(0)) and m.is_recorded(SYN_IMAGES)
    assert not shard.exists()
    run_stages(run_copy)  # the next run recomputes exactly that, to the same bytes
    assert files(run_copy) == before
    assert check(RunFS(run_copy), quick=False)[0] == []


def test_a_damaged_second_synthesis_batch_is_redone_alone(run_copy, finished, capsys):
    before = files(finished)
    commit1 = sha(run_copy / syn_commit(1))
    chunk = run_copy / "synthesis" / "images.zarr" / "images" / "c" / "1" / "0" / "0" / "0"
    assert chunk.exists(), sorted(p.name for p in chunk.parent.parent.iterdir())
    flip_byte_keeping_stat(chunk, offset=len(chunk.read_bytes()) // 2)
    plan = plan_repair(RunFS(run_copy), check(RunFS(run_copy), quick=False)[0])
    assert plan.first_batch == 2
    assert SYN_IMAGES in plan.forget and labels_epoch(0) in plan.forget
    assert teacher_weights(0) not in plan.forget
    assert main(["repair", str(run_copy)]) == 0
    assert "synthesis redoes batches from 2" in capsys.readouterr().out
    assert (run_copy / syn_commit(1)).exists() and not (run_copy / syn_commit(2)).exists()
    run_stages(run_copy)
    record = json.loads((run_copy / syn_commit(2)).read_text())
    assert record["resumed_from_iteration"] is None  # batch 2 redone from its start
    assert sha(run_copy / syn_commit(1)) == commit1  # batch 1 kept, not recomputed
    assert files(run_copy) == before  # same process, same code: the same bytes


def test_a_repair_killed_part_way_is_finished_by_the_next_call(run_copy, finished, monkeypatch):
    """The manifest forgot batch 2 and what follows, then the process died before the files
    went: the next `d3s repair` finishes it (before, the damaged shard stayed and Zarr's
    read-before-write failed every later run with a raw checksum error)."""
    before = files(finished)
    shard = run_copy / "synthesis" / "images.zarr" / "images" / "c" / "1" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-100])
    fs = RunFS(run_copy)
    plan = plan_repair(fs, check(fs, quick=False)[0])
    assert plan.first_batch == 2
    real_remove = RunFS.remove

    def killed(self, rel, recursive=False):
        raise KeyboardInterrupt  # the kill, after the manifest's write

    monkeypatch.setattr(RunFS, "remove", killed)
    with pytest.raises(KeyboardInterrupt):
        repair(fs, plan)
    monkeypatch.setattr(RunFS, "remove", real_remove)
    assert not Manifest(fs).is_recorded(SYN_IMAGES) and shard.exists()
    assert (run_copy / "repair.json").exists()
    assert main(["repair", str(run_copy)]) == 0  # finishes it first, then finds nothing
    assert not (run_copy / "repair.json").exists() and not shard.exists()
    run_stages(run_copy)
    assert files(run_copy) == before


def test_a_broken_manifest_without_a_previous_generation_starts_over(run_copy, finished, capsys):
    """Nothing on disk can be proven: `d3s repair` says so and removes what a stage would
    otherwise reuse unproven (the commit records); the next run recomputes the same bytes."""
    before = files(finished)
    (run_copy / "manifest.prev.json").unlink()
    (run_copy / "manifest.json").write_text("{")
    assert main(["verify", str(run_copy)]) == 2
    assert "no previous generation" in capsys.readouterr().err
    assert main(["repair", str(run_copy)]) == 0
    assert "nothing on disk can be proven" in capsys.readouterr().out
    assert sorted(p.name for p in run_copy.iterdir() if not p.name.startswith(".lock")) == [
        "config.json",
        "dataset",
        "manifest.json",
    ]
    run_stages(run_copy)
    assert files(run_copy) == before


def test_a_damaged_commit_record_of_an_unfinished_synthesis_is_repaired(run_copy, finished):
    """Synthesis not recorded yet (killed before its end) and batch 1's commit record damaged:
    `d3s repair` finds it (the record's own checksum) and synthesis is redone from batch 1."""
    before = files(finished)
    fs = RunFS(run_copy)
    Manifest(fs).forget_all(
        [k for k in Manifest(fs).entries() if k.startswith(("synthesis", "labels", "valid"))]
    )
    record = run_copy / syn_commit(1)
    text = record.read_text()
    assert '"iterations": 4' in text
    record.write_text(text.replace('"iterations": 4', '"iterations": 5'))  # still JSON
    assert main(["repair", str(run_copy)]) == 0
    assert not record.exists()
    run_stages(run_copy)
    assert files(run_copy) == before


def test_a_missing_artifact_is_repaired_too(run_copy, capsys):
    (run_copy / "validation" / "summary.json").unlink()
    assert main(["verify", str(run_copy), "--quick"]) == 1
    assert "MISSING" in capsys.readouterr().out
    assert main(["repair", str(run_copy)]) == 0
    run_stages(run_copy)
    assert (run_copy / "validation" / "summary.json").exists()


def test_dependents_follow_the_stages():
    assert "synthesis/" in dependents("teachers/teacher_1.safetensors")
    assert "stats.zarr/teacher_1" in dependents("teachers/teacher_1.json")
    assert "stats.zarr/teacher_0" not in dependents("teachers/teacher_1.json")
    assert dependents("stats.zarr/teacher_0") == [
        "stats.zarr/teacher_0",
        "synthesis/",
        "labels/",
        "validation/",
        "validation-hard/",  # the hard protocol's students on the same images
    ]
    assert dependents("labels/epoch=3/part-0.parquet")[1] == "validation/"
    assert dependents("baselines/random-real/labels/epoch=0/part-0.parquet")[1] == (
        "baselines/random-real/validation/"
    )
    assert dependents("validation/resnet18-seed1/weights.safetensors") == [
        "validation/resnet18-seed1/",
        "validation/summary.json",
    ]


# ---------------------------------------------------------------- through Prefect


def test_flow_never_reuses_damaged_artifacts_and_repairs_them(
    prefect_server,
    finished,
    tmp_path,
):
    """A finished run whose artifacts are then damaged: `d3s run` fails naming the file and the
    remedy (the stage results Prefect cached stand for files that are no longer as written);
    `d3s run --repair` recomputes them. A copy of the root is checked as itself: the copy's
    damage is named with the copy's path, and a clean copy completes on its own files."""
    root = tmp_path / "flow"
    shutil.copytree(finished, root)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    assert main(["run", str(config), "--root", str(root)]) == 0  # fills Prefect's cache
    before = files(root)
    shard = root / labels_epoch(1)
    shard.write_bytes(shard.read_bytes()[:-100])
    copy = tmp_path / "flow-copy"
    shutil.copytree(root, copy)
    assert main(["run", str(config), "--root", str(root)]) == 2
    assert main(["run", str(config), "--root", str(copy)]) == 2
    assert main(["run", str(config), "--root", str(root), "--repair"]) == 0
    assert sha(shard) == before[str(labels_epoch(1))]  # relabelled, to the same bytes
    assert check(RunFS(root), quick=False)[0] == []

    partial = tmp_path / "partial"
    shutil.copytree(finished, partial)
    shutil.rmtree(partial / "stats.zarr")
    assert main(["run", str(config), "--root", str(partial)]) == 2


def test_flow_error_names_the_file_and_remedy(prefect_server, finished, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    shard = copy / labels_epoch(0)
    shard.write_bytes(b"not parquet")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    assert main(["run", str(config), "--root", str(copy)]) == 2
    err = capsys.readouterr().err
    assert f"{copy}/labels/epoch=0/part-0.parquet: damaged" in err
    assert f"d3s repair {copy}" in err and "d3s run --repair" in err


# ---------------------------------------------------------------- one stage table


def echo_stage(run, progress=None):
    """An extra stage for the test below: it counts the distilled images and records that."""
    from storage.arrays import read_images

    rel = "echo/count.json"
    if run.manifest.is_recorded(rel):
        run.manifest.verify(rel)
    else:
        n = len(read_images(run.fs, SYN_IMAGES)[0])
        run.fs.write_bytes(rel, json.dumps({"images": n}).encode())
        run.manifest.record(rel, stage="echo")
    return run.fs.url(rel)


def echo_status(ctx):
    return {"echo": "done" if "echo/count.json" in ctx.done else "to do"}


def test_an_extra_stage_in_the_table_is_everywhere(
    prefect_server, finished, tmp_path, monkeypatch, capsys
):
    """A stage added to the table alone (runner and status function here) is a subcommand,
    a status line, a dependent of what it reads, a stage of the flow and a row of the plan."""
    from flows.cli import build_parser, status
    from tasks import stage_table
    from tasks.stage_table import Artifact, Stage

    echo = Stage(
        "echo",
        "count the distilled images",
        runner=f"{__name__}:echo_stage",
        status=f"{__name__}:echo_status",
        artifacts=(Artifact("echo/", ("synthesis/images.zarr",)),),
        version=1,
        after=("synthesis",),
        extra=True,
    )
    monkeypatch.setattr(stage_table, "STAGES", (*stage_table.STAGES, echo))
    assert "echo/" in dependents("synthesis/images.zarr")
    assert "echo/" in dependents("teachers/teacher_0.json")  # through the images
    assert dependents("echo/count.json") == ["echo/count.json"]
    assert "echo" in build_parser().format_help()
    from tasks.plan import make_plan

    plan = make_plan(parse_config(CONFIG), read_data=False)
    rows = [r["stage"] for r in plan["stages"]]
    assert rows[-1] == "echo" and plan["totals"]["not_estimated"] == ["data", "echo"]

    root = tmp_path / "run"
    shutil.copytree(finished, root)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    assert status(str(root))["echo"] == "to do"
    assert main(["run", str(config), "--root", str(root)]) == 0  # the flow runs it
    assert json.loads((root / "echo/count.json").read_text()) == {"images": 20}
    assert "echo/count.json" in Manifest(RunFS(root)).entries()
    assert status(str(root))["echo"] == "done"
    (root / "echo/count.json").unlink()
    assert main(["echo", str(config), "--root", str(root)]) == 2  # recorded, but missing
    assert main(["repair", str(root)]) == 0
    capsys.readouterr()
    assert main(["echo", str(config), "--root", str(root)]) == 0  # the subcommand redoes it
    assert capsys.readouterr().out.strip().endswith("echo/count.json")
