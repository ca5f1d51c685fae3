"""The distribution-match diagnostic (d3s_core/diagnostics.py) against float64 numpy.cov and
torch.distributions, and its invariants; the chunked reader it runs on (storage/arrays.py)."""

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from d3s_core.diagnostics import set_match
from d3s_core.stats import as_samples
from storage.arrays import create_images, image_chunks, write_image_batch
from storage.fs import RunFS

from .helpers import measured


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 12, 12, generator=g) * 2 - 1


def _chunks(x, y, size):
    return zip(x.split(size), y.split(size), strict=True)


def test_set_match_equals_an_independent_computation():
    teacher = measured(0)
    x, y = _images(10, 5), torch.arange(10) % 4
    (r,) = set_match([teacher], _chunks(x, y, 3))
    assert r.images == 10
    with torch.no_grad():
        logits, acts = teacher(x)
    for layer, (a, t) in enumerate(zip(acts, teacher.targets, strict=True)):
        s = as_samples(a).double().numpy()
        mu_s = torch.from_numpy(s.mean(0))
        cov_s = torch.from_numpy(np.cov(s, rowvar=False, bias=True))
        eye = torch.eye(len(mu_s), dtype=torch.float64)
        ref = kl_divergence(
            MultivariateNormal(mu_s, cov_s + t.ridge * eye),
            MultivariateNormal(t.mean, t.cov + t.ridge * eye),
        )
        assert abs(float(r.kl[layer]) - float(ref)) <= 1e-6 * max(1.0, abs(float(ref)))
    probs = logits.double().softmax(1)
    assert r.top1 == float((logits.argmax(1) == y).double().mean())
    # (the reference forward is one batch, set_match's three chunks: float32 rounding differs)
    assert abs(r.confidence - float(probs[torch.arange(10), y].mean())) < 1e-6


def test_set_match_does_not_depend_on_chunking_and_sees_a_shift():
    teachers = [measured(1), measured(2)]
    x, y = _images(24, 6), torch.arange(24) % 4
    whole = set_match(teachers, _chunks(x, y, 256))
    pieces = set_match(teachers, _chunks(x, y, 5))
    for a, b in zip(whole, pieces, strict=True):
        torch.testing.assert_close(a.kl, b.kl, rtol=1e-9, atol=1e-9)
        assert (a.top1, a.confidence, a.images) == (b.top1, b.confidence, b.images)
    # One teacher alone gives what it gives beside another (one pass serves every teacher).
    (alone,) = set_match(teachers[1:], _chunks(x, y, 7))
    torch.testing.assert_close(alone.kl, whole[1].kl, rtol=1e-9, atol=1e-9)
    # The targets were measured on U(-1, 1) images: a set from that distribution matches them
    # far better than the same set shifted.
    (shifted,) = set_match(teachers[:1], _chunks(x + 0.8, y, 256))
    assert float(shifted.kl.sum()) > 2 * float(whole[0].kl.sum())


def test_set_match_refuses_an_empty_set():
    with pytest.raises(ValueError, match="no images"):
        set_match([measured(0)], iter([]))


def test_image_chunks_stream_the_whole_set(tmp_path):
    fs = RunFS(tmp_path)
    x, y = _images(23, 7), torch.arange(23) % 4
    create_images(fs, "images.zarr", 23, (3, 12, 12), 10, y, {})
    write_image_batch(fs, "images.zarr", 0, x)
    parts = list(image_chunks(fs, "images.zarr", chunk=8))
    assert [len(p[0]) for p in parts] == [8, 8, 7]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
