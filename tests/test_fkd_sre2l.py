"""Our FKD export (storage/fkd.py) read and trained on by SRe2L's own code, on CPU.

tests/test_fkd.py reads an export with a re-implementation of SRe2L's loader. This file runs
SRe2L's code itself (VILA-Lab/SRe2L: SRe2L/validate/train_FKD.py `main()` and `train()`,
SRe2L/relabel/utils_fkd.py, SRe2L/validate/utils.py, and the data-loader fetcher patch printed
in SRe2L/validate/README.md), unmodified, from tests/third_party/sre2l/src/ (or $SRE2L_DIR).
Those files are not in this repository (see tests/third_party/sre2l/README.md for why and how
to put them there); without them the tests skip.

The only adaptations are shims, all below: a `wandb` module that records what it is given;
the README's patched `_MapDatasetFetcher.fetch` set on torch's class (instead of editing
torch's source file); and, without CUDA, `Tensor.cuda`/`Module.cuda` as no-ops plus train_FKD's
own `torch.cuda.is_available()` answering True (its `main()` refuses to start otherwise).
"""

import hashlib
import importlib.util
import inspect
import math
import os
import shlex
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch.utils.data._utils import fetch as torch_fetch

from d3s_core.augment import apply_crops
from storage.fkd import export_fkd, fkd_coords
from storage.fs import RunFS
from storage.labels import read_epoch
from storage.run import labels_epoch

from .helpers import FKD_LABEL_EPOCHS as LABEL_EPOCHS
from .helpers import FKD_MEAN as MEAN
from .helpers import FKD_N as N
from .helpers import FKD_STD as STD
from .helpers import fkd_make_run, ramp_pixels

SRE2L = (
    Path(os.environ.get("SRE2L_DIR", Path(__file__).parent / "third_party" / "sre2l" / "src"))
    / "SRe2L"
)
# sha256 of the files as read from the repository index (tests/third_party/sre2l/README.md)
SRE2L_FILES = {
    "relabel/utils_fkd.py": "69b9819d525f51bd8c5e4ec37a961919afe6d9cdac54dd18b70393acb53b71c0",
    "validate/train_FKD.py": "3393f2cc033a0fde8eeb8d5c2e6060e38d052218adb1ee46dbfb6b0fee8de09e",
    "validate/utils.py": "1fe143c1aadaa13e99eee45d08a24bc1028262d78cc4172eab870f1791db2242",
    "validate/README.md": "3c59dfc80afe502c6bcd6ca82462c1ca854f9d71736699996bf451f54e970a2c",
}
pytestmark = [
    pytest.mark.external,
    pytest.mark.skipif(
        not all((SRE2L / f).is_file() for f in SRE2L_FILES),
        reason=f"SRe2L's code is not at {SRE2L} (tests/third_party/sre2l/README.md)",
    ),
]  # opt-in: pytest -m external tests/test_fkd_sre2l.py

# The run as tests/test_fkd.py builds it (helpers.fkd_make_run: N images of FKD_SIZE px,
# LABEL_EPOCHS epochs, ImageNet's mean/std as train_FKD.py normalises), with ImageNet's 1000
# classes: train_FKD.py's student has 1000 outputs.

CLASSES, FKD_EPOCHS, BATCH = 1000, 3, 10
MODEL = "d3s_tiny_student"  # put among torchvision.models for train_FKD.py to build by name


def tiny_student(pretrained=False):
    """What `torchvision.models.__dict__[args.model](pretrained=False)` builds here: a small
    model with ImageNet's 1000 outputs (resnet18 or mobilenet at 224 px is minutes on 2 CPUs)."""
    assert pretrained is False
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 8, stride=8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(128, CLASSES),
    )


def classes_of() -> torch.Tensor:
    """12 of the 1000 classes, 2 images each, not in index order (ImageFolder's order is not
    ours)."""
    return (torch.arange(N) * 7 % 12) * 83 + 3


def make_run(root, fmt: str) -> RunFS:
    """A finished run: N images of 12 of the 1000 classes, LABEL_EPOCHS labelled epochs."""
    return fkd_make_run(root, fmt, k=5, classes=CLASSES, class_of=classes_of())


# -- SRe2L's code, with the shims -------------------------------------------------------------
def patched_fetch():
    """`_MapDatasetFetcher.fetch` as SRe2L/validate/README.md prints it ("Modified code"),
    after checking that its "Original code" is this torch's method (so the patch replaces
    nothing else)."""
    readme = (SRE2L / "validate" / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("  ```", 1)[0]
    original, modified = block.split("  ### Modified code\n")
    original = textwrap.dedent(original.split("  ### Original code\n")[1]).strip()
    ours = inspect.getsource(torch_fetch._MapDatasetFetcher).strip()
    assert original == ours, "this torch's _MapDatasetFetcher is not the one SRe2L patched"
    namespace = dict(vars(torch_fetch))
    exec(textwrap.dedent(modified), namespace)  # noqa: S102  SRe2L's code, as printed
    return namespace["_MapDatasetFetcher"].fetch


class CudaAvailable(types.ModuleType):
    """torch, except that torch.cuda.is_available() is True: given to train_FKD.py alone."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = types.SimpleNamespace(is_available=lambda: True)

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.fixture
def sre2l(monkeypatch, tmp_path):
    """train_FKD.py imported from SRe2L's tree, with the shims; yields (module, wandb log,
    the directory the fetcher records each batch it yields to)."""
    for rel, digest in SRE2L_FILES.items():
        got = hashlib.sha256((SRE2L / rel).read_bytes()).hexdigest()
        assert got == digest, f"{SRE2L / rel} is not the version this test was written for"
    logged: list[dict] = []
    wandb = types.ModuleType("wandb")
    wandb.login = lambda **kw: None
    wandb.init = lambda **kw: None
    wandb.log = lambda metrics: logged.append(dict(metrics))
    wandb.finish = lambda: None
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    names = ("utils", "relabel", "relabel.utils_fkd")  # the modules train_FKD.py imports
    for k in names:
        monkeypatch.delitem(sys.modules, k, raising=False)  # any earlier ones come back after
    monkeypatch.syspath_prepend(str(SRE2L))  # `from relabel.utils_fkd import ...`
    monkeypatch.syspath_prepend(str(SRE2L / "validate"))  # `from utils import ...`
    spec = importlib.util.spec_from_file_location("train_FKD", SRE2L / "validate" / "train_FKD.py")
    train_fkd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_fkd)

    # the fetcher patch; it also saves what it returns, to check (workers are other processes)
    record_dir = tmp_path / "yielded"
    record_dir.mkdir()
    fetch = patched_fetch()

    def fetch_and_record(self, possibly_batched_index):
        out = fetch(self, possibly_batched_index)
        if getattr(self.dataset, "mode", None) == "fkd_load":
            idx = [int(i) for i in possibly_batched_index]
            name = f"{self.dataset.epoch}_{idx[0]}.pt"
            torch.save([idx, *out], record_dir / name)
        return out

    monkeypatch.setattr(torch_fetch._MapDatasetFetcher, "fetch", fetch_and_record)
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
        monkeypatch.setattr(train_fkd, "torch", CudaAvailable())
    try:
        yield train_fkd, logged, record_dir
    finally:
        for k in names:
            sys.modules.pop(k, None)


def export(tmp_path, fmt: str, fp16: bool = True, seed: int = 42) -> tuple[RunFS, dict]:
    fs = make_run(tmp_path / "run", fmt)
    info = export_fkd(
        fs, "", tmp_path / "export", batch_size=BATCH, epochs=FKD_EPOCHS, seed=seed, fp16=fp16
    )
    return fs, info


def run_main(train_fkd, monkeypatch, info, tmp_path, extra: list[str], inputs=None) -> None:
    """train_FKD.py's main() with export.json's command line, the validation set pointed at
    the exported images (no ImageNet here), a tiny model and `extra`; `inputs` gets each batch
    the model is trained on."""

    def build(pretrained=False):
        model = tiny_student(pretrained)
        if inputs is not None:

            def record(module, args):
                if module.training:
                    inputs.append(args[0].detach().cpu().clone())

            model.register_forward_pre_hook(record)
        return model

    argv = shlex.split(info["sre2l_train_fkd"])[1:]
    argv += [
        "--val-dir",
        info["train_dir"],
        "--output-dir",
        str(tmp_path / "save"),
        "--model",
        MODEL,
        *extra,
    ]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setitem(torchvision.models.__dict__, MODEL, build)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pin_memory without an accelerator
        train_fkd.main()


# -- tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fmt, fp16, mix, workers",
    [("fp16", True, None, 0), ("topk", True, "cutmix", 2), ("fp32", False, "mixup", 0)],
)
def test_sre2l_train_fkd_trains_on_our_export(
    sre2l, monkeypatch, tmp_path, fmt, fp16, mix, workers
):
    train_fkd, logged, record_dir = sre2l
    fs, info = export(tmp_path, fmt, fp16)
    extra = ["-j", str(workers), "--gradient-accumulation-steps", "2"]
    extra += ["--mix-type", mix] if mix else []
    inputs: list[torch.Tensor] = []
    run_main(train_fkd, monkeypatch, info, tmp_path, extra, inputs)

    # it trained every exported epoch with a finite loss, and validated at 0 and the last
    assert [m["train/epoch"] for m in logged] == list(range(FKD_EPOCHS))
    for m in logged:
        assert math.isfinite(m["train/loss"]) and m["train/loss"] > 0
    assert [m.get("val/epoch") for m in logged] == [0, None, FKD_EPOCHS - 1]
    assert (tmp_path / "save" / "checkpoint.pth.tar").is_file()

    # what its data loader yielded: for each image, our labels, box and flip
    labs = [read_epoch(fs, labels_epoch(e), e) for e in range(LABEL_EPOCHS)]
    ds_paths = sorted(Path(info["train_dir"]).glob("*/*.png"))
    present = sorted({int(p.parent.name) for p in ds_paths})
    images = ramp_pixels()
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    records = sorted(record_dir.iterdir())
    yielded = {}  # (epoch, our image index) -> the image the loader yielded
    for e in range(FKD_EPOCHS):
        batches = [torch.load(p, weights_only=True) for p in records if p.name.startswith(f"{e}_")]
        assert sorted(len(b[0]) for b in batches) == [4, 10, 10]
        seen = []
        lab = labs[e % LABEL_EPOCHS]
        for idx, (imgs, target, flip, coords), mix_index, mix_lam, mix_bbox, soft in batches:
            b = len(idx)
            assert torch.equal(mix_index, torch.arange(b)) and mix_lam == 1.0
            assert mix_bbox == [0, 0, 0, 0]
            assert soft.dtype == (torch.float16 if fp16 else torch.float32)
            assert soft.shape == (b, CLASSES) and imgs.shape == (b, 3, 224, 224)
            for p, j in enumerate(idx):
                ours = int(ds_paths[j].stem)  # {image_index:08d}.png
                px = imgs[p] * std + mean
                assert round(float(px[2].mean()) * 255 / 10) == ours  # the blue level
                seen.append(ours)
                yielded[e, ours] = imgs[p]
                # ImageFolder's target: the rank of the class folder among those exported
                assert int(target[p]) == present.index(int(classes_of()[ours]))
                row = int((lab.image_index == ours).nonzero())
                assert torch.equal(soft[p], lab.logits[row].to(soft.dtype))
                torch.testing.assert_close(coords[p], fkd_coords(lab.boxes[row : row + 1])[0])
                assert bool(flip[p]) == bool(lab.flips[row])
                mine = apply_crops(
                    images[ours : ours + 1],
                    lab.boxes[row : row + 1],
                    lab.flips[row : row + 1],
                    size=224,
                )[0]
                assert (px[:2] - mine[:2]).abs().mean() < 0.03
        assert sorted(seen) == list(range(N))  # each image once per epoch

    # and train() fed the model exactly those images: the identity mixing record leaves them
    # unchanged under --mix-type cutmix and mixup too (gradient accumulation: batches of 5)
    assert [len(x) for x in inputs] == [5, 5, 5, 5, 4] * FKD_EPOCHS
    trained = torch.cat(inputs).split(N)
    for e in range(FKD_EPOCHS):
        for x in trained[e]:
            ours = round(float(x[2].mean() * STD[2] + MEAN[2]) * 255 / 10)
            assert torch.equal(x, yielded[e, ours])


def test_sre2l_reads_only_exports_with_seed_42(sre2l, monkeypatch, tmp_path):
    """train_FKD.py's sampler uses --fkd_seed, but ImageFolder_FKD_MIX calls
    get_img2batch_idx_list without it (seed 42): with another seed, the first image of a batch
    is looked up in seed 42's batches, and is not there (or, by chance, names a wrong batch)."""
    train_fkd, logged, _ = sre2l
    _, info = export(tmp_path, "fp16", seed=7)
    assert "--fkd_seed 7" in info["sre2l_train_fkd"]
    with pytest.raises(KeyError) as err:
        run_main(train_fkd, monkeypatch, info, tmp_path, ["-j", "0"])
    assert err.traceback[-1].name == "load_batch_config"  # img2batch_idx_list[epoch][img_idx]
    assert logged == []
