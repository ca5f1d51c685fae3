"""Small shared builders for the tests."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from d3s_core.augment import draw_crops, quantise_boxes
from d3s_core.isu import RunningStats
from d3s_core.labelling import EpochLabels, epoch_batches
from d3s_core.layers import FeatureHooks, default_measured_layers
from d3s_core.loss import prepare_target
from d3s_core.models import build_model
from d3s_core.stats import SuffStats
from d3s_core.synthesis import MeasuredTeacher, SynthesisConfig, init_state
from storage.arrays import create_images, write_image_batch
from storage.config import parse_config
from storage.fs import RunFS
from storage.labels import BOX_COLUMNS, write_epoch, write_schema
from storage.manifest import Manifest
from storage.run import SYN_IMAGES, labels_epoch, open_run
from storage.webdataset import TarShardDataset
from tasks.plan import WORK_KINDS
from tasks.stages import STAGES

from .configs import SYN


def tiny_teacher(num_classes: int = 4, in_chans: int = 3, width: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return build_model("small_resnet", num_classes, in_chans=in_chans, low_res=True, width=width)


def random_spd(c: int, cond: float = 10.0, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Symmetric positive definite matrix with condition number `cond`."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=dtype))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), c, dtype=dtype)
    return (q * eig) @ q.T


# -- synthesis: tiny measured teachers and a short run (tests/test_synthesis.py) ---------------
SIZE = 12


def measured(seed, num_classes=4, size=SIZE):
    """A tiny teacher and its Gaussians, measured on 64 random images of `size` px."""
    model = tiny_teacher(num_classes=num_classes, seed=seed).eval()
    names = default_measured_layers(model)
    g = torch.Generator().manual_seed(100 + seed)
    data = torch.rand(64, 3, size, size, generator=g) * 2 - 1
    with FeatureHooks(model, names) as hooks, torch.no_grad():
        model(data)
        stats = [SuffStats.from_batch(a, "float64").mean_cov() for a in hooks.outputs]
    return MeasuredTeacher(model, names, [prepare_target(m, c) for m, c in stats])


CFG = SynthesisConfig(iterations=12, lr=0.1, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def fresh_state(b=1, n=6, dtype=torch.float32):
    labels = torch.arange(n) % 4
    return init_state(b, labels, (3, SIZE, SIZE), seed=7, dtype=dtype)


def running_for(teachers):
    return RunningStats.zeros([t.channels for t in teachers])


# -- the streaming synthesis run (tests/test_synthesis_streaming.py) ---------------------------
def streaming_config(**synthesis):
    """SYN parsed, with `synthesis` options over its own."""
    return parse_config({**SYN, "synthesis": {**SYN["synthesis"], **synthesis}})


# -- a run's checksums (tests/test_resume_kill.py) ---------------------------------------------
def checksums(root):
    entries = Manifest(RunFS(root)).entries()
    return {k: v["sha256"] for k, v in entries.items()}


# -- ImageFolder trees and teachers trained from them (tests/test_inputs.py) -------------------
def make_tree(root, classes=10, per_class=3, mode="L", size=28):
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            shape = (size, size) if mode == "L" else (size, size, 3)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(d / f"{i}.png")
    return root


def folder_config(train, val, dataset=None, **teachers):
    return parse_config(
        {
            "preset": "demo-mnist",
            "dataset": {
                "kind": "imagefolder",
                "path": str(train),
                "val_path": str(val),
                **(dataset or {}),
            },
            "teachers": {"count": 1, "train": {"epochs": 1}, **teachers},
            "stats": {"workers": 0},
        }
    )


def run_teachers(root, cfg):
    with open_run(root, cfg) as run:
        STAGES["data"](run)
        STAGES["teachers"](run)


# -- WebDataset tar shards and the same samples as a tree (tests/test_webdataset.py) -----------
WDS_MEAN, WDS_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def make_samples(classes=4, per_class=5, size=16, rgb=True, seed=0):
    """[(key, class, png bytes)] in ImageFolder order (class, then file name)."""
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if rgb else (size, size)
    return [
        (f"{c:02d}_{i:04d}", c, png(rng.integers(0, 255, shape, dtype=np.uint8)))
        for c in range(classes)
        for i in range(per_class)
    ]


def write_tree(root, samples):
    for key, c, data in samples:
        (root / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
        (root / f"class_{c:02d}" / f"{key}.png").write_bytes(data)
    return root


def tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shards(folder, samples, counts, prefix="train"):
    """Shards `prefix-00000k.tar` of `counts` consecutive samples each."""
    folder.mkdir(parents=True, exist_ok=True)
    assert sum(counts) == len(samples)
    start = 0
    for k, n in enumerate(counts):
        with tarfile.open(folder / f"{prefix}-{k:06d}.tar", "w") as tf:
            for key, c, data in samples[start : start + n]:
                tar_add(tf, f"{key}.png", data)
                tar_add(tf, f"{key}.cls", str(c).encode())
                tar_add(tf, f"{key}.json", b'{"source": "test"}')
        start += n
    return folder


def tar_ds(spec, size=16, rgb=True, num_classes=4):
    chans = 3 if rgb else 1
    return TarShardDataset(spec, size, chans, WDS_MEAN[:chans], WDS_STD[:chans], num_classes)


# -- a finished run for the FKD export (tests/test_fkd.py) -------------------------------------
FKD_N, FKD_CLASSES, FKD_SIZE, FKD_LABEL_EPOCHS = 24, 4, 32, 2
FKD_MEAN, FKD_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def ramp_pixels() -> torch.Tensor:
    """(N, 3, S, S) in [0, 1], multiples of 1/255: red rises left to right, green top to
    bottom (so a wrong flip or swapped axes shows), blue is 10 * i / 255 (names image i)."""
    n, size = FKD_N, FKD_SIZE
    ramp = torch.round(torch.arange(size) * 255 / (size - 1)) / 255
    px = torch.empty(n, 3, size, size)
    px[:, 0] = ramp.view(1, 1, size)
    px[:, 1] = ramp.view(1, size, 1)
    px[:, 2] = (10 * torch.arange(n) / 255).view(n, 1, 1)
    return px


def fkd_make_run(root, fmt="fp16", k=2, classes=FKD_CLASSES, class_of=None) -> RunFS:
    """A run root with finished images of `classes` classes (`class_of`: the class of each
    image; default: not in index order) and FKD_LABEL_EPOCHS labelled epochs."""
    n, size, mean, std = FKD_N, FKD_SIZE, FKD_MEAN, FKD_STD
    fs = RunFS(root)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    images = (ramp_pixels() - m) / s
    if class_of is None:
        class_of = (torch.arange(n) * 7) % FKD_CLASSES
    create_images(fs, SYN_IMAGES, n, (3, size, size), n, class_of, {"mean": mean, "std": std})
    write_image_batch(fs, SYN_IMAGES, 0, images)
    manifest = Manifest(fs)
    manifest.record(SYN_IMAGES, "synthesis")
    write_schema(fs, fmt, classes, k)
    g = torch.Generator().manual_seed(1)
    for e in range(FKD_LABEL_EPOCHS):
        batches = epoch_batches(n, 5, seed=3, epoch=e)
        boxes, flips = draw_crops(n, g)
        lab = EpochLabels(
            e,
            torch.cat([torch.full((len(b),), i) for i, b in enumerate(batches)]),
            torch.cat([torch.arange(len(b)) for b in batches]),
            torch.cat(batches),
            boxes,
            flips,
            3 * torch.randn(n, classes, generator=g),
        )
        write_epoch(fs, labels_epoch(e), lab, fmt, k)
        manifest.record(labels_epoch(e), "labels", epoch=e)
    return fs


# -- label epochs, in this schema and as schema version 1 wrote them (test_label_formats.py) ---
def epoch(n=12, classes=10, on_grid=True):
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(n, 4, generator=g)
    return EpochLabels(
        0,
        torch.arange(n) // 4,
        torch.arange(n) % 4,
        torch.randperm(n, generator=g),
        quantise_boxes(boxes) if on_grid else boxes,
        torch.rand(n, generator=g) > 0.5,
        torch.randn(n, classes, generator=g),
    )


def v1_table(lab: EpochLabels, fmt: str, k: int = 3) -> pa.Table:
    """A file as schema version 1 wrote it: float32 boxes, int64 image_index, int32 top-k
    indices, float32 top-k values and rest."""

    def fixed(a, t):
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), type=t), a.shape[1])

    boxes = lab.boxes.numpy().astype(np.float32)
    cols = {
        "epoch": pa.array(np.zeros(len(lab.batch), np.int32)),
        "batch": pa.array(lab.batch.numpy().astype(np.int32)),
        "position": pa.array(lab.position.numpy().astype(np.int32)),
        "image_index": pa.array(lab.image_index.numpy().astype(np.int64)),
        **{c: pa.array(boxes[:, j]) for j, c in enumerate(BOX_COLUMNS)},
        "flip": pa.array(lab.flips.numpy()),
    }
    logits = lab.logits.numpy()
    if fmt == "fp32":
        cols["logits"] = fixed(logits, pa.float32())
    elif fmt == "fp16":
        cols["logits"] = fixed(logits.astype(np.float16), pa.float16())
    else:
        vals, idx = lab.logits.topk(k, dim=1)
        cols["topk_indices"] = fixed(idx.numpy().astype(np.int32), pa.int32())
        cols["topk_values"] = fixed(vals.numpy(), pa.float32())
        cols["topk_rest"] = pa.array(np.zeros(len(logits), np.float32))
    meta = {b"d3s_labels_schema": b"1", b"d3s_label_format": fmt.encode()}
    meta[b"d3s_classes"] = str(logits.shape[1]).encode()
    return pa.table(cols).replace_schema_metadata(meta)


REPO = Path(__file__).resolve().parents[1]


def probe(root: Path, classes: int, ipc: int, size: int, *extra: str) -> dict:
    """bench/scale_probe.py on a synthetic run of `classes` x `ipc` images of `size` px in a
    process of its own: its JSON report (peak RSS per stage)."""
    cmd = [
        sys.executable,
        str(REPO / "bench" / "scale_probe.py"),
        "--root",
        str(root),
        "--classes",
        str(classes),
        "--ipc",
        str(ipc),
        "--size",
        str(size),
        "--label-epochs",
        "1",
        "--student-epochs",
        "1",
        "--forbid-whole-sets",
        *extra,
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


# -- ImageFolder trees of shapes no preset has (tests/test_own_dataset.py, test_plan_data.py) --
def rgb_image(c: int, i: int, size: int, rng: np.random.Generator) -> Image.Image:
    """A class-dependent colour and stripe over noise."""
    base = np.array([(37 * c) % 256, (91 * c + 40) % 256, (53 * c + 120) % 256], dtype=np.float64)
    px = rng.normal(base, 40.0, size=(size, size, 3))
    px[:, (c * 3) % size : (c * 3) % size + 3] = 255
    return Image.fromarray(np.clip(px, 0, 255).astype(np.uint8), "RGB")


def _grey_image(c: int, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    px = rng.normal(60 + 70 * c, 30.0, size=(h, w))
    return Image.fromarray(np.clip(px, 0, 255).astype(np.uint8), "L")


def rgb_tree(root: Path, classes: int = 10, per_class: int = 12, val: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val)):
        for c in range(classes):
            d = root / split / f"class_{c:02d}"
            d.mkdir(parents=True)
            for i in range(n):
                rgb_image(c, i, 32, rng).save(d / f"{i}.png")
    return root


GREY_SIZES = [(23, 31), (40, 29), (35, 35), (27, 44), (52, 33), (30, 26)]


def grey_tree(root: Path, classes: int = 3, per_class: int = 12, val: int = 3) -> Path:
    rng = np.random.default_rng(1)
    names = ["cat", "dog", "eel"][:classes]
    for split, n in (("train", per_class), ("val", val)):
        for c, name in enumerate(names):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                w, h = GREY_SIZES[(i + c) % len(GREY_SIZES)]
                _grey_image(c, w, h, rng).save(d / f"{i}.png")
    return root


def tiny(dataset: dict, **over) -> dict:
    """Every stage at a few seconds' worth of work."""
    cfg = {
        "preset": "demo-mnist",
        "dataset": {"kind": "imagefolder", **dataset},
        "model": {"width": 4},
        "teachers": {"count": 1, "train": {"epochs": 1, "batch_size": 32}},
        "stats": {"batch_size": 64, "workers": 0, "checkpoint_batches": 2},
        "synthesis": {
            "ipc": 1,
            "batch_size": 8,
            "checkpoint_every": 5,
            "checkpoint_seconds": 0,
            "params": {"iterations": 5},
        },
        "labels": {"epochs": 2, "batch_size": 8},
        "validation": {"students": 1, "epochs": 1, "checkpoint_every_epochs": 1},
    }
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


# -- plan configs (tests/test_plan.py, test_plan_data.py) ----------------------------------
def in21k_cfg(ipc: int, **synthesis):
    return parse_config(
        {
            "name": "in21k",
            "preset": "imagenet-21k",
            "device": "cuda",
            "dataset": {"kind": "imagefolder", "path": "/nonexistent/in21k/train"},
            "teachers": {"count": 5},
            "stats": {"batch_size": 256, "workers": 8},
            "synthesis": {"ipc": ipc, "batch_size": 200, **synthesis},
            "labels": {"epochs": 300, "batch_size": 128, "format": "fp16"},
            "validation": {"students": 3, "random_real_baseline": True},
        }
    )


def unit_table(tmp_path, rate: float = 1e9) -> Path:
    point = {k: {"flops_per_image": 1e8, "flops_per_s": rate} for k in WORK_KINDS}
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"device": "test", "points": [{"name": "x", "work": point}]}))
    return table


# -- real SIGKILL inside a stage, then resume (tests/test_resume_kill.py, test_online_labels.py)
# A file that exists only while the stage is part-way through its work.
IN_PROGRESS = {
    "teachers": "teachers/checkpoints/teacher_0.json",
    "stats": "stats_shards/teacher_0/shard_000000.json",
    "synthesis": "synthesis/checkpoint/state.json",
    "labels": "labels/epoch=0/part-0.parquet",
    "validation": "validation/small_resnet-seed0/checkpoint.json",
}


def stage_cmd(root, config_path, stage):
    return [sys.executable, "-m", "flows.cli", stage, str(config_path), "--root", str(root)]


def run_killed(root, config_path, stage, rng):
    """Start the stage, SIGKILL it shortly after it is part-way through, then run it again to
    the end. Returns True if the kill landed while the stage was unfinished."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        stage_cmd(root, config_path, stage),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    marker = Path(root) / IN_PROGRESS[stage]
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    # The statistics pass of this tiny config lasts a fraction of a second: kill it sooner.
    time.sleep(rng.uniform(0.0, 0.05 if stage == "stats" else 0.4))
    landed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(
        stage_cmd(root, config_path, stage), cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return landed


# -- damaging a run and comparing its files (tests/test_integrity.py, test_damage_battery.py) --
def flip_byte_keeping_stat(path: Path, offset: int = -1) -> None:
    """Damage that keeps size and modification time (bit rot): the byte at `offset` inverted."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def run_files(root, skip=("manifest.", ".lock"), blank=None) -> dict[str, str]:
    """{relative path: sha256} of every file of a run but those starting with `skip` (the
    manifest and its previous generation, the lock); `blank(rel, bytes)` may rewrite a file's
    bytes before they are hashed."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            rel = p.relative_to(root).as_posix()
            if rel.startswith(skip):
                continue
            data = p.read_bytes()
            out[rel] = hashlib.sha256(blank(rel, data) if blank else data).hexdigest()
    return out
