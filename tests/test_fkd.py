"""FKD export read back the way SRe2L's train_FKD.py reads it; label byte counts against hand
formulas.

The reader below is written from SRe2L's code (VILA-Lab/SRe2L, SRe2L/relabel/utils_fkd.py:
get_FKD_info, get_img2batch_idx_list, ImageFolder_FKD_MIX, RandomResizedCropWithCoords,
RandomHorizontalFlipWithRes; SRe2L/validate/train_FKD.py: the sampler and the loop), not from
storage/fkd.py: a torchvision ImageFolder over the exported tree, a DataLoader with a
RandomSampler seeded 42, one torch.load per batch, the crop taken from the stored coords.
"""

import json
import os

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as t_F

from d3s_core.augment import apply_crops
from storage.fkd import export_fkd, main
from storage.label_sizes import (
    epoch_bytes,
    fkd_batch_file_bytes,
    fkd_dense_fp16_bytes,
    labels_bytes,
    parquet_epoch_bytes,
    schema_bytes,
)
from storage.labels import read_epoch
from storage.manifest import CorruptArtifact
from storage.run import labels_epoch

from .helpers import FKD_CLASSES as CLASSES
from .helpers import FKD_LABEL_EPOCHS as LABEL_EPOCHS
from .helpers import FKD_N as N
from .helpers import FKD_SIZE as SIZE
from .helpers import fkd_make_run as make_run
from .helpers import ramp_pixels


# -- an SRe2L-style reader --------------------------------------------------------------------
def sre2l_fkd_info(fkd_path):
    """get_FKD_info: epochs = entries of fkd_path, batch size from batch 0's flip_status."""
    max_epoch = len(os.listdir(fkd_path))
    batch_list = sorted(
        os.listdir(os.path.join(fkd_path + "epoch_0")),
        key=lambda s: int(s.split("_")[1].split(".tar")[0]),
    )
    first = torch.load(os.path.join(fkd_path, "epoch_0", batch_list[0]), weights_only=True)
    last = torch.load(os.path.join(fkd_path, "epoch_0", batch_list[-1]), weights_only=True)
    batch_size = first[1].size()[0]
    return max_epoch, batch_size, batch_size * (len(batch_list) - 1) + last[1].size()[0]


def sre2l_img2batch(num_img, batch_size, seed=42, epochs=300):
    """get_img2batch_idx_list: first image index of each batch -> batch index, per epoch."""
    sampler = RandomSampler(
        torch.utils.data.TensorDataset(torch.arange(num_img)),
        generator=torch.Generator().manual_seed(seed),
    )
    batch_sampler = torch.utils.data.BatchSampler(sampler, batch_size=batch_size, drop_last=False)
    out = []
    for _ in range(epochs):
        out.append({idx[0]: b for b, idx in enumerate(batch_sampler)})
    return out


class Indices(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def read_like_sre2l(out_dir, size=SIZE, seed=42):
    """Yield (epoch, record, [(image_folder_index, PIL crop as replayed)...]) in train order."""
    ds = torchvision.datasets.ImageFolder(os.path.join(out_dir, "train"))
    fkd_path = os.path.join(out_dir, "fkd") + "/"
    max_epoch, batch_size, num_img = sre2l_fkd_info(fkd_path)
    assert num_img == len(ds)
    img2batch = sre2l_img2batch(num_img, batch_size, seed, max_epoch)
    sampler = RandomSampler(Indices(len(ds)), generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(Indices(len(ds)), batch_size=batch_size, sampler=sampler)
    for epoch in range(max_epoch):
        for idx in loader:
            b = img2batch[epoch][int(idx[0])]
            path = os.path.join(fkd_path, f"epoch_{epoch}", f"batch_{b}.tar")
            record = torch.load(path, weights_only=True)
            crops = []
            for p, j in enumerate(idx.tolist()):
                img = ds.loader(ds.samples[j][0])
                coords = record[0][p]  # RandomResizedCropWithCoords, replay branch
                i_, j_ = coords[0].item() * img.size[1], coords[1].item() * img.size[0]
                h_, w_ = coords[2].item() * img.size[1], coords[3].item() * img.size[0]
                crop = t_F.resized_crop(
                    img, i_, j_, h_, w_, [size, size], InterpolationMode.BILINEAR
                )
                if record[1][p] == True:  # noqa: E712  RandomHorizontalFlipWithRes
                    crop = t_F.hflip(crop)
                crops.append((j, ds.samples[j][1], crop))
            yield epoch, record, crops


@pytest.mark.parametrize("fmt", ["fp16", "fp32", "topk"])
def test_export_reads_back_like_sre2l(tmp_path, fmt):
    fs = make_run(tmp_path / "run", fmt)
    out = tmp_path / "export"
    info = export_fkd(fs, "", out, batch_size=7, epochs=3)
    assert info["fkd_epochs"] == 3 and info["label_epochs"] == LABEL_EPOCHS
    labs = [read_epoch(fs, labels_epoch(e), e) for e in range(LABEL_EPOCHS)]
    images = ramp_pixels()
    classes = (torch.arange(N) * 7) % CLASSES
    seen = {e: [] for e in range(3)}
    for epoch, record, crops in read_like_sre2l(str(out)):
        coords, flips, mix_index, mix_lam, mix_bbox, soft = record
        b = len(crops)
        # what SRe2L's code expects of each field
        assert coords.dtype == torch.float32 and coords.shape == (b, 4)
        assert flips.dtype == torch.bool and flips.shape == (b,)
        assert mix_index.dtype == torch.int64 and torch.equal(mix_index, torch.arange(b))
        assert mix_lam == 1.0 and mix_bbox == [0, 0, 0, 0]
        assert soft.dtype == torch.float16 and soft.shape == (b, CLASSES)
        lab = labs[epoch % LABEL_EPOCHS]
        for p, (_, target, crop) in enumerate(crops):
            ours = int(round(np.asarray(crop)[0, 0, 2] / 10))  # the blue level names it
            seen[epoch].append(ours)
            assert target == classes[ours]
            row = int((lab.image_index == ours).nonzero())
            x0, y0, x1, y1 = lab.boxes[row].tolist()
            torch.testing.assert_close(coords[p], torch.tensor([y0, x0, y1 - y0, x1 - x0]))
            assert bool(flips[p]) == bool(lab.flips[row])
            # the soft label is our stored logits for this image (fp16; topk_rest outside top-k)
            torch.testing.assert_close(soft[p].float(), lab.logits[row].half().float())
            # and the replayed crop is our crop of it, up to PIL's rounding of the box to
            # whole pixels (<= 0.5 px a side; the ramps rise 8 levels a pixel)
            replay = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).float() / 255
            mine = apply_crops(
                images[ours : ours + 1], lab.boxes[row : row + 1], lab.flips[row : row + 1]
            )[0]
            assert (replay[:2] - mine[:2]).abs().mean() < 0.03
            assert (replay[:2] - mine[:2]).abs().max() < 0.12
    for e in range(3):  # every image once per epoch
        assert sorted(seen[e]) == list(range(N))
    exported = json.loads((out / "export.json").read_text())
    assert exported["batch_size"] == 7 and exported["images"] == N


def test_identity_mix_record_leaves_images_unchanged(tmp_path):
    """SRe2L's cutmix/mixup in fkd_load mode, applied with the exported record."""
    fs = make_run(tmp_path / "run")
    export_fkd(fs, "", tmp_path / "export", batch_size=8, epochs=1)
    _, idx, lam, bbox, _ = torch.load(
        tmp_path / "export" / "fkd" / "epoch_0" / "batch_0.tar", weights_only=True
    )[1:]
    x = torch.randn(8, 3, SIZE, SIZE)
    cut = x.clone()
    bbx1, bby1, bbx2, bby2 = bbox
    cut[:, :, bbx1:bbx2, bby1:bby2] = cut[idx, :, bbx1:bbx2, bby1:bby2]
    assert torch.equal(cut, x)
    assert torch.equal(lam * x + (1 - lam) * x[idx], x)


def test_export_checks_the_manifest_and_refuses_a_used_directory(tmp_path):
    fs = make_run(tmp_path / "run")
    shard = tmp_path / "run" / labels_epoch(1)
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    with pytest.raises(CorruptArtifact, match="epoch=1"):
        export_fkd(fs, "", tmp_path / "a")
    fs = make_run(tmp_path / "run2")
    export_fkd(fs, "", tmp_path / "b", batch_size=8)
    with pytest.raises(FileExistsError):
        export_fkd(fs, "", tmp_path / "b", batch_size=8)
    export_fkd(fs, "", tmp_path / "b", batch_size=12, overwrite=True)
    assert sorted(os.listdir(tmp_path / "b" / "fkd" / "epoch_0")) == ["batch_0.tar", "batch_1.tar"]
    assert sorted(os.listdir(tmp_path / "b")) == ["export.json", "fkd", "train"]


def test_cli(tmp_path, capsys):
    make_run(tmp_path / "run")
    main([str(tmp_path / "run"), str(tmp_path / "out"), "--batch-size", "10", "--mix", "none"])
    assert json.loads(capsys.readouterr().out)["mix_record"] == "none"
    rec = torch.load(tmp_path / "out" / "fkd" / "epoch_1" / "batch_2.tar", weights_only=True)
    assert rec[2:5] == [None, None, None] and len(rec[0]) == 4  # 24 = 10 + 10 + 4
    assert "warning" not in capsys.readouterr().err
    # SRe2L's loader finds batches with seed 42 whatever --fkd_seed says: another seed warns.
    main([str(tmp_path / "run"), str(tmp_path / "out7"), "--batch-size", "10", "--fkd-seed", "7"])
    assert "--fkd-seed 7" in capsys.readouterr().err


# -- bytes ------------------------------------------------------------------------------------
def test_label_bytes_against_hand_formulas():
    n, c = 1000, 1000
    fp32 = parquet_epoch_bytes(n, c, "fp32")
    fp16 = parquet_epoch_bytes(n, c, "fp16")
    # No dictionary on float columns (write_epoch keeps them to repeating ones). Logits N*C*4
    # (fp32) or N*C*2 (fp16), less what zstd finds in the exponent bits of normal draws (~7%
    # and ~8%), plus per row 4 uint16 box codes (<= 4 bytes each as Parquet INT32) and the ids
    assert n * (0.9 * 4 * c) < fp32 <= n * (4 * c + 32)
    assert n * (0.9 * 2 * c) < fp16 <= n * (2 * c + 32)
    # top-k: k float16 values (2 bytes) and k int16 indices (a dictionary of the classes) per row
    k4, k8 = parquet_epoch_bytes(n, c, "topk", 4), parquet_epoch_bytes(n, c, "topk", 8)
    assert n * 4 * 2 < k8 - k4 <= n * 4 * 4 * 1.05
    # E epochs are E files
    assert labels_bytes(n, c, 30, "topk", 4) == 30 * k4 + schema_bytes("topk", c, 4)
    # FKD: the fp16 labels alone, and a batch file = payload + a few KB of zip/pickle overhead
    assert fkd_dense_fp16_bytes(n, c, 300) == n * c * 2 * 300
    payload = 64 * (2 * c + 16 + 1 + 8)
    assert payload < fkd_batch_file_bytes(64, c) < payload + 4096
    assert (
        abs(fkd_batch_file_bytes(64, c, fp16=False) - fkd_batch_file_bytes(64, c) - 64 * c * 2)
        < 128
    )
    ratio = fkd_dense_fp16_bytes(n, c, 300) / labels_bytes(n, c, 30, "topk", 4)
    assert 0.9 < ratio / (n * c * 2 * 300 / (30 * k4)) < 1.1


def test_line_fit_is_close_to_a_full_write():
    full = parquet_epoch_bytes(4000, 50, "fp16")
    fit = epoch_bytes(4000, 50, "fp16", max_rows=2000)
    assert abs(fit / full - 1) < 0.1
