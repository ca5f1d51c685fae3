"""Checkpoints written on a background thread (storage.states.BackgroundSaver): the state
written is the one at `save`, whatever happens to the tensors afterwards; a failed write is
raised by the next `wait` or `save`; one write is in flight at a time."""

import threading

import pytest
import torch

import storage.states as states
from storage.fs import RunFS
from storage.states import BackgroundSaver, load_state


def test_state_written_is_the_one_at_save_time(tmp_path):
    fs = RunFS(tmp_path)
    images = torch.arange(12, dtype=torch.float32).view(3, 4)
    saver = BackgroundSaver(fs)
    saver.save("ckpt/state", {"images": images, "iteration": torch.tensor(5)}, {"batch": 1})
    images.add_(100.0)  # the next iterations update the images in place at once
    saver.wait()
    state, meta = load_state(fs, "ckpt/state")
    assert torch.equal(state["images"], torch.arange(12, dtype=torch.float32).view(3, 4))
    assert int(state["iteration"]) == 5 and meta == {"batch": 1}


def test_one_write_in_flight_and_the_last_one_wins(tmp_path, monkeypatch):
    fs = RunFS(tmp_path)
    running, most = [0], [0]
    guard = threading.Lock()
    real = states.save_state

    def slow_save(*args, **kwargs):
        with guard:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            threading.Event().wait(0.05)
            real(*args, **kwargs)
        finally:
            with guard:
                running[0] -= 1

    monkeypatch.setattr(states, "save_state", slow_save)
    saver = BackgroundSaver(fs)
    for i in range(4):
        saver.save("ckpt/state", {"i": torch.tensor(i)})
    saver.wait()
    assert most[0] == 1
    assert int(load_state(fs, "ckpt/state")[0]["i"]) == 3
    assert len([f for f in fs.listdir("ckpt") if f.endswith(".safetensors")]) == 1


def test_a_failed_write_is_raised_in_the_caller(tmp_path, monkeypatch):
    fs = RunFS(tmp_path)

    def failing(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(states, "save_state", failing)
    saver = BackgroundSaver(fs)
    saver.save("ckpt/state", {"x": torch.zeros(2)})
    with pytest.raises(OSError, match="No space"):
        saver.wait()
    saver.wait()  # reported once
    with pytest.raises(OSError, match="No space"), BackgroundSaver(fs) as s:
        s.save("ckpt/state", {"x": torch.zeros(2)})
