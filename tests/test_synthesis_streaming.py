"""The synthesis stage at scale: it never reads the whole image set, resumes without reading
committed batches, keeps only the ISU state resume needs (and rebuilds an older one from the
stored images, exactly), checkpoints by wall-clock as well as iterations, and shows a bounded
grid."""

import json

import pytest
import torch

import storage.arrays
import tasks.stages.synthesis as syn
from storage.run import SYN_IMAGES, open_run, syn_commit, syn_isu
from storage.states import has_state, save_state

from .helpers import streaming_config

read_images = storage.arrays.read_images  # the tests' own reader (the stage's is refused)


def no_whole_set(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the synthesis stage read the whole image set")

    monkeypatch.setattr(storage.arrays, "read_images", refuse)
    monkeypatch.setattr(syn, "read_images", refuse, raising=False)


def isu_states(root):
    return sorted(p.name for p in (root / "synthesis" / "isu").glob("*.json"))


def test_stage_streams_prunes_isu_and_bounds_the_grid(streaming_root, monkeypatch):
    no_whole_set(monkeypatch)
    torch.set_num_threads(1)
    with open_run(streaming_root, streaming_config()) as run:
        syn.synthesize(run)
    assert isu_states(streaming_root) == []  # a finished set keeps none (its images hold it)
    grid = json.loads((streaming_root / "synthesis" / "png" / "grid.json").read_text())
    assert grid["classes"] == list(range(10)) and len(grid["rows"]) == 30
    # A large class count shows at most 10 classes x 10 images, first and last included.
    picked, rows = syn.grid_rows(10450, 10)
    assert len(picked) == 10 and picked[0] == 0 and picked[-1] == 10449 and len(rows) == 100
    assert all(r < 104500 and r % 10450 in picked for r in rows)


def test_repair_rebuilds_a_pruned_isu_state_exactly(streaming_root, monkeypatch, caplog):
    torch.set_num_threads(1)
    with open_run(streaming_root, streaming_config()) as run:
        syn.synthesize(run)
    images = read_images(run.fs, SYN_IMAGES)[0]
    commit3 = json.loads((streaming_root / syn_commit(3)).read_text())
    # Forget batch 3 as `d3s repair` does: its record and state, and the finished store.
    (streaming_root / syn_commit(3)).unlink()
    for p in (streaming_root / "synthesis" / "isu").glob("after_batch_000003.*"):
        p.unlink()
    run.manifest.forget(SYN_IMAGES)
    assert not has_state(run.fs, syn_isu(2))  # pruned: rebuilt from batches 1-2's images
    # A state after batch 2 that is there but damaged (bit rot): removed, and rebuilt the same.
    save_state(run.fs, syn_isu(2), {"means": [torch.zeros(3)], "covs": [torch.zeros(3, 3)]})
    (blob,) = (streaming_root / "synthesis" / "isu").glob("after_batch_000002.*.safetensors")
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    no_whole_set(monkeypatch)
    with open_run(streaming_root, streaming_config()) as run:
        syn.synthesize(run)
    assert "a damaged checkpoint, removed" in caplog.text
    again = json.loads((streaming_root / syn_commit(3)).read_text())
    assert again["images_sha256"] == commit3["images_sha256"]
    # Batch 3 was synthesised against the ISU statistics after batch 2, rebuilt from batches
    # 1-2's images: its images are the uninterrupted run's.
    assert torch.equal(read_images(run.fs, SYN_IMAGES)[0], images)


def test_resume_reads_no_committed_batch_before_iterating(streaming_root, monkeypatch):
    torch.set_num_threads(1)
    with open_run(streaming_root, streaming_config()) as run:
        syn.synthesize(run)
    for b in (2, 3):  # batches 2-3 to redo; batch 1 committed, ISU after 1 kept
        (streaming_root / syn_commit(b)).unlink()
    run.manifest.forget(SYN_IMAGES)
    reads: list[tuple] = []
    real_rows = syn.read_image_rows
    monkeypatch.setattr(syn, "read_image_rows", lambda *a: reads.append(a[2:]) or real_rows(*a))
    first_iteration_reads: list[int] = []
    real_iterations = syn.run_iterations

    def iterations(*a, **k):
        first_iteration_reads.append(len(reads))
        return real_iterations(*a, **k)

    monkeypatch.setattr(syn, "run_iterations", iterations)
    with open_run(streaming_root, streaming_config()) as run:
        syn.synthesize(run)
    # Batch 1's ISU state is gone (pruned when batch 3 committed), so it is rebuilt from batch
    # 1's rows: one batch read before iterating, then batch 1 checked once at the end.
    assert first_iteration_reads[0] == 1 and reads[0] == (0, 10)
    assert reads[-1] == (0, 10) and len(reads) == 2


def test_checkpoints_follow_checkpoint_seconds(streaming_root, monkeypatch):
    saves: list[int] = []
    real_save = syn.BackgroundSaver.save

    def save(self, rel, state, meta=None):
        saves.append(meta["iteration"])
        return real_save(self, rel, state, meta)

    monkeypatch.setattr(syn.BackgroundSaver, "save", save)
    torch.set_num_threads(1)
    with open_run(streaming_root, streaming_config(checkpoint_seconds=3600)) as run:
        syn.synthesize(run)
    assert saves == []  # no interval took an hour: nothing written mid-batch
    for name in ("batches", "isu", "checkpoint"):
        import shutil

        shutil.rmtree(streaming_root / "synthesis" / name, ignore_errors=True)
    run.manifest.forget(SYN_IMAGES)
    with open_run(streaming_root, streaming_config(checkpoint_seconds=0)) as run:
        syn.synthesize(run)
    assert saves == [1, 2, 3] * 3  # every interval but the last of each of 3 batches


def test_a_crash_at_the_stage_end_redoes_no_batch(streaming_root, monkeypatch):
    """Killed while writing the grid (after every batch committed): the restart iterates
    nothing, checks the committed batches one at a time and finishes the store."""
    torch.set_num_threads(1)
    real_export = syn.export_png
    monkeypatch.setattr(syn, "export_png", lambda *a: (_ for _ in ()).throw(RuntimeError("kill")))
    with (
        open_run(streaming_root, streaming_config()) as run,
        pytest.raises(RuntimeError, match="kill"),
    ):
        syn.synthesize(run)
    assert not run.manifest.is_recorded(SYN_IMAGES)
    monkeypatch.setattr(syn, "export_png", real_export)
    monkeypatch.setattr(syn, "run_iterations", lambda *a, **k: pytest.fail("a batch was redone"))
    no_whole_set(monkeypatch)
    with open_run(streaming_root, streaming_config()) as run:
        syn.synthesize(run)
        assert run.manifest.is_recorded(SYN_IMAGES)
    assert (streaming_root / "synthesis" / "png" / "grid.png").exists()
