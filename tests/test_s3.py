"""The run root as an s3:// URL, against a real S3 server (moto) on 127.0.0.1."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from storage.config import parse_config
from storage.fs import RunFS
from storage.lock import RunLock, RunLocked
from storage.run import SYN_IMAGES, labels_epoch, open_run
from tasks.stages import STAGES

from .configs import SMALL


def test_s3_root_round_trips(s3_endpoint):
    opts = {"endpoint_url": s3_endpoint}
    cfg = parse_config(SMALL)
    torch.set_num_threads(1)
    with open_run("s3://runs/exp1", cfg, **opts) as run:
        for fn in STAGES.values():
            fn(run)
        local_manifest = run.manifest.entries()
        # A second writer is refused while the lease is fresh.
        with pytest.raises(RunLocked):
            RunLock(RunFS("s3://runs/exp1", **opts)).acquire()
    assert "validation/summary.json" in local_manifest
    # Independent readers, straight from S3.
    g = zarr.open_group(
        "s3://runs/exp1/" + SYN_IMAGES, mode="r", storage_options={"endpoint_url": s3_endpoint}
    )
    images = np.asarray(g["images"][:])
    assert images.shape == (10, 1, 28, 28) and np.isfinite(images).all()
    fs = RunFS("s3://runs/exp1", **opts)
    table = pq.read_table(fs.path(labels_epoch(0)), filesystem=fs.fs)
    assert table.num_rows == 10 and "logits" in table.column_names
    # Done is done: re-running verifies against the manifest and recomputes nothing.
    with open_run("s3://runs/exp1", cfg, **opts) as run:
        for fn in STAGES.values():
            fn(run)
        assert run.manifest.entries() == local_manifest


def test_teacher_weights_import_from_an_s3_url(s3_endpoint):
    import boto3
    from safetensors.torch import save

    from storage.checkpoints import read_state_dict

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="weights")
    blob = save({"fc.weight": torch.arange(6.0).view(2, 3)})
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(
        Bucket="weights", Key="teacher.safetensors", Body=blob
    )
    sd = read_state_dict("s3://weights/teacher.safetensors")
    assert torch.equal(sd["fc.weight"], torch.arange(6.0).view(2, 3))
    with pytest.raises(FileNotFoundError, match="s3://weights/missing.safetensors"):
        read_state_dict("s3://weights/missing.safetensors")
