"""Label formats read back: dense exactly (fp32) or to fp16; top-k with the other classes at
the mean of their logits (older files without that column: -inf)."""

import pyarrow.parquet as pq
import torch

from d3s_core.labelling import EpochLabels
from storage.fs import RunFS
from storage.labels import read_epoch, write_epoch


def epoch(n=12, classes=10):
    g = torch.Generator().manual_seed(0)
    return EpochLabels(
        0,
        torch.arange(n) // 4,
        torch.arange(n) % 4,
        torch.randperm(n, generator=g),
        torch.rand(n, 4, generator=g),
        torch.rand(n, generator=g) > 0.5,
        torch.randn(n, classes, generator=g),
    )


def test_formats_read_back(tmp_path):
    fs, lab = RunFS(tmp_path), epoch()
    for fmt in ("fp32", "fp16"):
        write_epoch(fs, f"{fmt}.parquet", lab, fmt)
        back = read_epoch(fs, f"{fmt}.parquet", 0)
        want = lab.logits if fmt == "fp32" else lab.logits.half().float()
        assert torch.equal(back.logits, want) and torch.equal(back.boxes, lab.boxes)
    write_epoch(fs, "top3.parquet", lab, "topk", 3)
    back = read_epoch(fs, "top3.parquet", 0).logits
    vals, idx = lab.logits.topk(3, dim=1)
    assert torch.equal(back.gather(1, idx), vals)
    rest = torch.ones_like(lab.logits, dtype=torch.bool).scatter_(1, idx, False)
    tail = (lab.logits * rest).sum(1) / 7
    torch.testing.assert_close(back[rest].view(-1, 7), tail[:, None].expand(-1, 7))
    # A file written before the tail column existed: all mass on the stored classes.
    table = pq.read_table(tmp_path / "top3.parquet")
    pq.write_table(table.drop(["topk_rest"]), tmp_path / "old.parquet")
    old = read_epoch(fs, "old.parquet", 0).logits
    assert torch.isneginf(old[rest]).all() and torch.equal(old.gather(1, idx), vals)
