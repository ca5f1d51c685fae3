"""The `d3s` command: one stage at a time, status, clear errors."""

import json

from flows.cli import main, status
from storage.run import SYN_CHECKPOINT
from storage.states import save_state

from .test_storage_safety import SMALL


def test_stage_commands_and_status(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(SMALL))
    root = str(tmp_path / "run")
    assert main(["teachers", str(cfg), "--root", root]) == 0
    assert main(["stats", str(cfg), "--root", root]) == 0
    s = status(root)
    assert s["teachers"] == "2/2" and s["stats"] == "2/2"
    assert s["synthesis"] == "0/1 batches" and s["labels"] == "0/2 epochs"
    # An in-progress batch shows where it is.
    from storage.fs import RunFS

    save_state(RunFS(root), SYN_CHECKPOINT, {"iteration": 3}, {"batch": 1})
    assert status(root)["synthesis"] == "0/1 batches, batch 1 at iteration 3/4"
    # What the stage writes: the iteration in the marker, so status reads no tensors.
    meta = {"batch": 1, "iteration": 2, "losses": [5.0, 4.0]}
    save_state(RunFS(root), SYN_CHECKPOINT, {"iteration": 2}, meta)
    import storage.states

    def no_tensors(*a, **k):
        raise AssertionError("status read the checkpoint's tensors")

    monkeypatch.setattr(storage.states, "load_state", no_tensors)
    monkeypatch.setattr("flows.cli.load_state", no_tensors)
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
