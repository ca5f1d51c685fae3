"""The `d3s` command: one stage at a time, status, clear errors."""

import json

from flows.cli import main, status
from storage.run import SYN_CHECKPOINT
from storage.states import save_state

from .configs import SMALL


def test_stage_commands_and_status(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(SMALL))
    root = str(tmp_path / "run")
    assert main(["data", str(cfg), "--root", root]) == 0
    assert main(["teachers", str(cfg), "--root", root]) == 0
    assert main(["stats", str(cfg), "--root", root]) == 0
    s = status(root)
    assert s["teachers"] == "2/2" and s["stats"] == "2/2"
    assert s["synthesis"] == "0/1 batches" and s["labels"] == "0/2 epochs"
    # An in-progress batch shows where it is.
    from storage.fs import RunFS

    save_state(RunFS(root), SYN_CHECKPOINT, {"iteration": 3}, {"batch": 0})  # the first batch
    assert status(root)["synthesis"] == "0/1 batches, batch 1 at iteration 3/4"
    # What the stage writes: the iteration in the marker, so status reads no tensors.
    meta = {"batch": 0, "iteration": 2, "losses": [5.0, 4.0]}
    save_state(RunFS(root), SYN_CHECKPOINT, {"iteration": 2}, meta)
    import tasks.status

    def no_tensors(*a, **k):
        raise AssertionError("status read the checkpoint's tensors")

    monkeypatch.setattr(tasks.status, "load_state", no_tensors)
    assert status(root)["synthesis"] == "0/1 batches, batch 1 at iteration 2/4"
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["status", root]) == 0
    assert "teachers    2/2" in capsys.readouterr().out


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"synthesis": {"ipcc": 1}}))
    assert main(["stats", str(cfg), "--root", str(tmp_path / "r")]) == 2
    assert "synthesis.ipcc" in capsys.readouterr().err


def _stop_after_first_epoch(stage, fraction, info):
    if "loss" in info:  # an epoch finished (its checkpoint saved first): stop as a kill would
        raise KeyboardInterrupt


def test_status_inside_teachers_and_validation(tmp_path, monkeypatch):
    """Mid-stage, status names the teacher (or student) in progress and its epoch, 1-based, from
    its checkpoint marker alone."""
    import pytest
    import torch

    import tasks.status
    from storage.config import parse_config
    from storage.fs import RunFS
    from storage.run import open_run, student_dir
    from tasks.stages import STAGES

    torch.set_num_threads(1)
    cfg = {
        **SMALL,
        "teachers": {"count": 2, "train": {"epochs": 3}, "checkpoint_every_epochs": 1},
        "validation": {"students": 2, "epochs": 4, "checkpoint_every_epochs": 1},
    }
    root = tmp_path / "run"
    with open_run(root, parse_config(cfg)) as run, pytest.raises(KeyboardInterrupt):
        STAGES["data"](run)
        STAGES["teachers"](run, _stop_after_first_epoch)
    assert (root / "teachers/checkpoints/teacher_0.json").exists()

    def no_tensors(*a, **k):
        raise AssertionError("status read a checkpoint's tensors")

    monkeypatch.setattr(tasks.status, "load_state", no_tensors)
    s = status(str(root))
    assert s["teachers"] == "0/2, teacher 1 of 2, epoch 1 of 3 done"
    assert s["validation"] == "0/2 students"
    # A student's checkpoint marker holds one KD loss per epoch done (tasks/stages/validation.py).
    monkeypatch.undo()
    arch = parse_config(cfg).student_arch()
    save_state(
        RunFS(root),
        f"{student_dir(arch, 1)}/checkpoint",
        {"epochs_done": 3},
        {"losses": [3.0, 2.0, 1.0]},
    )
    assert status(str(root))["validation"] == "0/2 students, student 2 of 2, epoch 3 of 4 done"


def _write_results(root, students, baseline=None):
    from storage.fs import RunFS

    fs = RunFS(root)
    for m, acc in enumerate((0.9, 0.8)):
        fs.write_bytes(f"teachers/teacher_{m}.json", json.dumps({"held_out_top1": acc}).encode())
    for rel, accs in (("validation", students), ("baselines/random-real/validation", baseline)):
        if accs is None:
            continue
        mean = sum(accs) / len(accs)
        std = (
            (sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5 if len(accs) > 1 else 0.0
        )
        summary = {
            "students": len(accs),
            "top1": accs,
            "mean": mean,
            "std": std,
            "distilled_images": 20,
        }
        fs.write_bytes(f"{rel}/summary.json", json.dumps(summary).encode())
    return fs


def test_run_prints_report_and_headline(tmp_path, capsys, monkeypatch):
    """`d3s run` ends with the report's path and the numbers, not the summary's path."""
    import sys
    import types

    root = str(tmp_path / "run")
    fake = types.ModuleType("flows.distill")

    def distill(root, config, repair):
        fs = _write_results(root, [0.5, 0.7], baseline=[0.4, 0.4])
        return fs.url("validation/summary.json")

    fake.distill = distill
    monkeypatch.setitem(sys.modules, "flows.distill", fake)
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(SMALL))
    assert main(["run", str(cfg), "--root", root]) == 0
    out = capsys.readouterr().out
    assert "summary.json" not in out
    lines = out.splitlines()
    from reporting.report import REPORT

    assert lines[0].startswith("report") and lines[0].endswith(REPORT)
    assert "85.0 % (mean of 2 teachers)" in lines[1]
    assert "60.0 ± 14.1 % (n = 2)" in lines[2]
    assert "40.0 ± 0.0 % (n = 2)" in lines[3]  # a measured spread of zero is shown


def test_headline_with_one_student(tmp_path):
    from flows.cli import headline
    from storage.config import parse_config

    root = str(tmp_path / "run")
    _write_results(root, [0.625])
    lines = headline(root, parse_config(SMALL))
    assert len(lines) == 3  # no baseline
    assert "62.5 % (n = 1)" in lines[2] and "±" not in lines[2]
