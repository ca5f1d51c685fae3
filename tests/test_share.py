"""storage/share.py: finished artifacts copied between run roots, verified, recorded with
their source, idempotent; damaged sources and conflicting destinations are errors."""

import pytest

from storage.fs import RunFS
from storage.manifest import CorruptArtifact, Manifest
from storage.share import copy_artifacts


def _src(tmp_path):
    src = RunFS(tmp_path / "src")
    src.write_bytes("teachers/teacher_0.safetensors", b"weights")
    src.write_bytes("teachers/checkpoints/teacher_0.json", b"in progress")
    src.write_bytes("stats.zarr/zarr.json", b"{}")
    src.write_bytes("stats.zarr/teacher_0/layer_00/mean", b"mu")
    m = Manifest(src)
    m.record("teachers/teacher_0.safetensors", "teachers", note="x")
    m.record("stats.zarr/teacher_0", "stats")
    return src


def test_copy_is_verified_recorded_and_idempotent(tmp_path):
    src, dst = _src(tmp_path), RunFS(tmp_path / "dst")
    assert copy_artifacts(src, dst, "teachers/") == ["teachers/teacher_0.safetensors"]
    assert copy_artifacts(src, dst, "stats.zarr/", extra=("stats.zarr",)) == [
        "stats.zarr/teacher_0"
    ]
    done = Manifest(dst).entries()
    for key in ("teachers/teacher_0.safetensors", "stats.zarr/teacher_0"):
        assert done[key]["sha256"] == Manifest(src).checksum(key)
        assert done[key]["copied_from"] == src.url(key)
    assert done["teachers/teacher_0.safetensors"]["note"] == "x"
    assert dst.read_bytes("stats.zarr/zarr.json") == b"{}"  # the group's own metadata
    assert not dst.exists("teachers/checkpoints")  # resume state is never copied
    before = dst.read_bytes("manifest.json")
    copy_artifacts(src, dst, "teachers/")  # again: verified and kept
    assert dst.read_bytes("manifest.json") == before


def test_damaged_source_and_conflicting_destination_are_errors(tmp_path):
    src, dst = _src(tmp_path), RunFS(tmp_path / "dst")
    dst.write_bytes("teachers/teacher_0.safetensors", b"its own")
    Manifest(dst).record("teachers/teacher_0.safetensors", "teachers")
    with pytest.raises(CorruptArtifact, match="already has its own"):
        copy_artifacts(src, dst, "teachers/")
    src.write_bytes("stats.zarr/teacher_0/layer_00/mean", b"damaged")
    with pytest.raises(CorruptArtifact, match="checksum mismatch"):
        copy_artifacts(src, RunFS(tmp_path / "other"), "stats.zarr/")
    with pytest.raises(CorruptArtifact, match="no finished artifact"):
        copy_artifacts(src, dst, "synthesis/")


def test_label_epochs_of_an_older_schema_are_not_shared(tmp_path):
    import pyarrow.parquet as pq

    from storage.labels import write_epoch
    from storage.run import labels_epoch
    from storage.share import seed_run

    from .helpers import epoch, v1_table

    src = _src(tmp_path)
    write_epoch(src, labels_epoch(0), epoch(), "fp16")  # this code's schema
    with src.atomic_local_path(labels_epoch(1)) as tmp:
        pq.write_table(v1_table(epoch(on_grid=False), "fp16"), tmp)
    src.write_bytes("labels/_schema.json", b"{}")
    m = Manifest(src)
    for e in (0, 1):
        m.record(labels_epoch(e), "labels")
    dst = RunFS(tmp_path / "dst")
    seeded = seed_run(dst, src, stats=False, labels_from=src, label_epochs=2)
    assert seeded["labels"] == [labels_epoch(0)]
    assert not dst.exists(labels_epoch(1))  # the labels stage writes it again
    # An epoch the run already has (here: another labelling of epoch 1, as when a study grew
    # and the source of its label epochs changed) is its own and kept.
    write_epoch(dst, labels_epoch(1), epoch(n=5), "fp16")
    Manifest(dst).record(labels_epoch(1), "labels")
    own = dst.read_bytes(labels_epoch(1))
    write_epoch(src, labels_epoch(1), epoch(), "fp16")  # the source now has a v2 epoch 1
    Manifest(src).record(labels_epoch(1), "labels")
    assert "labels" not in seed_run(dst, src, stats=False, labels_from=src, label_epochs=2)
    assert dst.read_bytes(labels_epoch(1)) == own
