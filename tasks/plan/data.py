"""What the plan takes from the data: class count, training images, channels and image size.

The user's data is read where it is reachable, by the run's own code: the run root's data
profile (`dataset/profile.json`) when the root has one for this dataset, else the profile
measured now by `tasks.stages.profile.data_profile` on a run that holds no lock, so nothing is
written (`observe_data`: the one place the planner calls the run's data code). Where the data
is not on this machine (or `--no-data`), the config's declarations, the dataset kind's own
numbers and the preset's are used, and the plan says which.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

from d3s_core.presets import PRESETS, DataShape
from storage.config import RunConfig, load_config
from storage.fs import RunFS
from storage.imagefolder import IMAGE_EXTENSIONS, class_folders
from storage.manifest import Manifest
from storage.profile import PROFILE, read_profile
from storage.run import Run
from tasks.credentials import storage_options
from tasks.stages.profile import measure_profile

from .units import ceil_div

# Training images of the presets' datasets, for configs whose data is not on this machine:
# each preset's own count (d3s_core/presets.py `train_images`).
KNOWN_TRAIN_IMAGES = {
    name: PRESETS[name].train_images for name in ("imagenet-1k", "imagenet-21k", "tiny-imagenet")
}
MNIST5K_PER_CLASS, MNIST5K_CLASSES = 500, 10  # the bundled digits: 500 of each class
# The largest class of the presets' training sets (the coreset pass holds one class's features).
KNOWN_MAX_CLASS_IMAGES = {"imagenet-1k": 1300, "tiny-imagenet": 500}  # ILSVRC-2012: 732-1,300
FILE_KINDS = ("imagefolder", "webdataset")


# -- the user's data --------------------------------------------------------------------------
@dataclass(frozen=True)
class DataFacts:
    """The run's data profile (storage/profile.py's dict: `values`, `sources`, `train_images`,
    `inspected`, `warnings`) and where the plan found it."""

    profile: dict[str, Any]
    where: str

    @property
    def values(self) -> dict[str, Any]:
        return self.profile["values"]


def _local(path: str | None) -> bool:
    return bool(path) and "://" not in str(path)


def reachable(cfg: RunConfig) -> bool:
    """Whether the dataset's files are on this machine (local paths that exist): ImageFolder
    trees, or tar shards (a folder, a file, or a brace pattern in an existing folder)."""
    d = cfg.dataset
    if d.kind not in FILE_KINDS or not _local(d.path):
        return False
    assert d.path is not None
    if d.kind == "imagefolder":
        return os.path.isdir(d.path)
    return os.path.exists(d.path) or os.path.isdir(os.path.dirname(d.path) or ".")


def _same_dataset(fs: Any, cfg: RunConfig) -> bool:
    """Whether the run root's saved config reads the same data as `cfg` (else its profile and
    index are another dataset's)."""

    try:
        return load_config(fs).dataset == cfg.dataset
    except Exception:  # no config, unreadable, an older schema: not this run's
        return False


def observe_data(cfg: RunConfig, root: str | None = None) -> DataFacts | None:
    """The data profile the run uses: the run root's `dataset/profile.json` where `root` holds
    a run of the same dataset with one (read, as every later stage reads it), else measured
    now on this machine by the run's own code where the data is reachable (`reachable`), else
    None. Nothing is written: the profile is found through a Run that holds no lock (whose
    stages neither write the profile nor the dataset index), rooted at `root` when that is a
    run of this dataset (its dataset index is read) or at an empty temporary folder."""

    fs = None
    if root:
        fs = RunFS(root, **storage_options(cfg))
        if not _same_dataset(fs, cfg):
            fs = None
    if fs is not None and (profile := read_profile(fs)) is not None:
        return DataFacts(profile, f"the run's {fs.url(PROFILE)}")
    if not reachable(cfg):
        return None
    where = "measured now, as the run measures it (tasks/stages/profile.py; nothing written)"
    if fs is not None:
        return DataFacts(measure_profile(Run(fs, cfg, Manifest(fs))), where)
    with tempfile.TemporaryDirectory(prefix="d3s-plan-") as scratch:
        fs = RunFS(scratch)
        profile = measure_profile(Run(fs, cfg, Manifest(fs)))
        left = os.listdir(scratch)
        assert not left, f"measuring the data profile wrote {left}"  # a lockless run writes none
    return DataFacts(profile, where)


def with_data(cfg: RunConfig, data: DataFacts | None) -> RunConfig:
    """`cfg` with the data's class count, channels, image size and normalisation declared in
    its `dataset` section, so that `planned_recipe` (and every count, size and model shape of
    the plan) follows the data. Only the plan uses the copy."""
    if data is None:
        return cfg
    v = data.values
    ds = cfg.dataset.model_copy(
        update={
            "num_classes": int(v["num_classes"]),
            "channels": int(v["channels"]),
            "image_size": int(v["image_size"]),
            "mean": list(v["mean"]),
            "std": list(v["std"]),
        }
    )
    return cfg.model_copy(update={"dataset": ds})


def _origin(source: str) -> str:
    """ "data", "config", "preset", "rule" or "--train-images": the word a source begins with."""
    for word in ("data", "config", "preset", "rule", "--train-images"):
        if source.startswith(word):
            return word
    return "data" if source.startswith(("mnist5k", "image files")) else "preset"


def shape_sources(
    cfg: RunConfig, data: DataFacts | None, train_source: str
) -> dict[str, dict[str, str]]:
    """Where each of the plan's data values came from: {value: {"from": data | config |
    preset | --train-images, "how": the words}}. `cfg` is the config as the user wrote it."""
    d, p = cfg.dataset, cfg.preset_obj()
    if data is not None:
        src = data.profile["sources"]
        how = {"classes": src["num_classes"], "channels": src["channels"]}
        how["image_size"] = src["image_size"]
    else:
        how = {}
        if d.kind == "mnist5k":
            how = dict.fromkeys(("classes", "channels", "image_size"), "data: the bundled digits")
        if d.num_classes is not None:
            how.setdefault("classes", "config: dataset.num_classes")
        elif d.kind == "imagefolder" and _local(d.path) and os.path.isdir(str(d.path)):
            how.setdefault("classes", f"data: class folders counted under {d.path}")
        how.setdefault("classes", f"preset {p.name!r}")
        for key, name in (("channels", "channels"), ("image_size", "image_size")):
            declared = getattr(d, name) is not None
            how.setdefault(key, f"config: dataset.{name}" if declared else f"preset {p.name!r}")
    how["train_images"] = train_source
    return {k: {"from": _origin(v), "how": v} for k, v in how.items()}


# -- the recipe -------------------------------------------------------------------------------
def planned_recipe(cfg: RunConfig):
    """The recipe the run will use, fitted to the data's shape as far as it is known: the
    `dataset.*` values (declared, or the data's: `with_data`), the class folders of a local
    ImageFolder tree, else the preset's (a run finds the rest from the data: docs/datasets.md)."""

    p, d = cfg.preset_obj(), cfg.dataset
    k = d.num_classes
    if k is None and d.kind == "imagefolder" and d.path and os.path.isdir(d.path):
        k = len(class_folders(d.path))
    if d.kind == "mnist5k":
        k, chans, size = 10, 1, 28
    else:
        chans, size = d.channels or p.in_chans, d.image_size or p.image_size
    mean = tuple(d.mean) if d.mean else (p.mean if len(p.mean) == chans else (0.5,) * chans)
    std = tuple(d.std) if d.std else (p.std if len(p.std) == chans else (0.25,) * chans)
    return cfg.fitted(DataShape(k or p.num_classes, chans, size, mean, std))


# -- the training set's size ------------------------------------------------------------------
def _count_image_files(root: str) -> int:

    n = 0
    for _, _, files in os.walk(root):
        n += sum(os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS for f in files)
    return n


def _stratified_train(per_class: list[int], test_fraction: float) -> int:
    """Training images left by storage.datasets.stratified_split (round per class)."""
    return sum(n - round(n * test_fraction) for n in per_class)


def train_images(
    cfg: RunConfig, given: int | None = None, data: DataFacts | None = None
) -> tuple[int, str]:
    """(number of training images, where it came from): --train-images, the data's profile,
    the dataset kind's own numbers, a count of a local tree's files, the preset's known size."""
    ds, p = cfg.dataset, planned_recipe(cfg)
    if given is not None:
        return given, "--train-images"
    if data is not None:
        n = int(data.profile["train_images"])
        return n, "data: the images of the training split"
    if ds.kind == "mnist5k":
        n = _stratified_train([MNIST5K_PER_CLASS] * MNIST5K_CLASSES, ds.test_fraction)
        return n, f"mnist5k: 5,000 digits less the held-out {ds.test_fraction:g}"
    if ds.kind == "synthetic":
        per, extra = divmod(ds.synthetic_size, p.num_classes)
        counts = [per + (c < extra) for c in range(p.num_classes)]
        n = _stratified_train([c for c in counts if c], ds.test_fraction)
        return n, f"config: dataset.synthetic_size {ds.synthetic_size} less the held-out part"
    if ds.kind == "imagefolder" and ds.path and os.path.isdir(ds.path):
        return _count_image_files(ds.path), f"image files counted under {ds.path}"
    if p.name in KNOWN_TRAIN_IMAGES:
        return KNOWN_TRAIN_IMAGES[p.name], f"preset {p.name}'s known size (--train-images N)"
    raise ValueError(
        f"the size of the {ds.kind} dataset at {ds.path} is not known here: pass --train-images N"
    )


def max_class_images(cfg: RunConfig, n_train: int) -> tuple[int, str]:
    """(training images of the largest class, where it came from): exact for the in-memory
    kinds and a local ImageFolder tree, the preset's known value, else an assumption."""
    ds, p = cfg.dataset, planned_recipe(cfg)
    if ds.kind == "mnist5k":
        return MNIST5K_PER_CLASS - round(MNIST5K_PER_CLASS * ds.test_fraction), "mnist5k"
    if ds.kind == "synthetic":
        per, extra = divmod(ds.synthetic_size, p.num_classes)
        big = per + (extra > 0)
        return big - round(big * ds.test_fraction), "dataset.synthetic_size"
    if ds.kind == "imagefolder" and ds.path and os.path.isdir(ds.path):
        try:
            names = class_folders(ds.path)
        except ValueError:  # no class folders: the run will say so
            names = []
        if names:
            sizes = [_count_image_files(os.path.join(ds.path, c)) for c in names]
            return max(sizes), f"image files counted under {ds.path}"
    if p.name in KNOWN_MAX_CLASS_IMAGES:
        return min(KNOWN_MAX_CLASS_IMAGES[p.name], n_train), f"preset {p.name}'s largest class"
    mean = ceil_div(n_train, p.num_classes)
    return min(2 * mean, n_train), "assumed: 2 x the mean class size"
