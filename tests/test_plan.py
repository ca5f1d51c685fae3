"""`d3s plan` (tasks/plan/): counts, disk and memory against independent computations."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from d3s_core.labelling import EpochLabels
from d3s_core.models import build_model
from flows.cli import main
from storage.config import parse_config
from storage.fs import RunFS
from storage.labels import write_epoch
from tasks import plan as P
from tasks.stages.working_set import EPOCH_INDEX_BYTES

from .helpers import in21k_cfg, unit_table

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo-mnist.json"


@pytest.fixture
def one_thread():
    """Tiny real models: one thread (two spin-wait for each other on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def demo_cfg():
    return parse_config(json.loads(DEMO.read_text()))


def epochs_of(raw: dict, p) -> tuple[int, int]:
    """(teacher epochs, student epochs) of a config: its own, else its preset's."""
    teacher = raw["teachers"].get("train", {}).get("epochs", p.teacher.epochs)
    return teacher, raw["validation"].get("epochs", p.student.epochs)


def test_demo_counts():
    raw = json.loads(DEMO.read_text())
    cfg = demo_cfg()
    p = cfg.preset_obj()
    teacher_epochs, student_epochs = epochs_of(raw, p)
    plan = P.make_plan(cfg)
    c = plan["counts"]
    from storage.datasets import load_mnist5k, stratified_split

    _, classes = load_mnist5k()
    n_train = len(stratified_split(classes, raw["dataset"]["test_fraction"], cfg.seed)[0])
    n = p.num_classes * raw["synthesis"]["ipc"]
    assert plan["train_images"]["count"] == n_train == 4000
    assert c["teachers"]["teachers"] == raw["teachers"]["count"]
    assert c["teachers"]["epochs"] == teacher_epochs
    assert c["teachers"]["steps_per_epoch"] == math.ceil(n_train / p.teacher.batch_size)
    batches = math.ceil(n_train / raw["stats"]["batch_size"])
    assert c["stats"]["batches"] == batches
    assert c["stats"]["shards"] == math.ceil(batches / raw["stats"]["checkpoint_batches"])
    assert c["synthesis"]["batches"] == math.ceil(n / raw["synthesis"]["batch_size"])
    assert c["synthesis"]["iterations"] == c["synthesis"]["batches"] * p.synthesis.iterations
    assert c["labels"]["epochs"] == raw["labels"]["epochs"]
    assert c["labels"]["batches_per_epoch"] == math.ceil(n / raw["labels"]["batch_size"])
    assert c["validation"]["students"] == raw["validation"]["students"]
    assert c["validation"]["epochs"] == student_epochs
    assert c["baseline_labels"] == c["labels"]  # random_real_baseline is on in the demo
    assert c["baseline_validation"] == c["validation"]
    # checkpoint_seconds 0: a checkpoint at every interval boundary but the batch's last
    w = plan["disk"]["synthesis_writes"]
    if raw["synthesis"].get("checkpoint_seconds") == 0:
        intervals = math.ceil(p.synthesis.iterations / raw["synthesis"]["checkpoint_every"])
        assert w["checkpoints"] == c["synthesis"]["batches"] * (intervals - 1)


def test_images_disk_is_what_images_zarr_holds(tmp_path):
    from storage.arrays import create_images

    cfg = demo_cfg()
    p = cfg.preset_obj()
    plan = P.make_plan(cfg)
    n = plan["shape"]["distilled_images"]
    shape = (p.in_chans, p.image_size, p.image_size)
    classes = torch.arange(p.num_classes).repeat(cfg.synthesis.ipc)
    create_images(RunFS(tmp_path), "images.zarr", n, shape, cfg.synthesis.batch_size, classes, {})
    images = zarr.open_group(str(tmp_path / "images.zarr"), mode="r")["images"]
    assert images.dtype == np.float32
    assert plan["disk"]["artifacts"]["synthesis_images"]["bytes"] == images.nbytes


def _written_epoch(tmp_path, n: int, classes: int, batch: int, fmt: str, k: int = 10) -> int:
    """An epoch file of n rows of random logits, built here (not by the plan's sampler)."""
    g = torch.Generator().manual_seed(7)
    order = torch.randperm(n, generator=g)
    batches = torch.arange(n) // batch
    x0 = torch.rand(n, 2, generator=g) * 0.5
    boxes = torch.cat([x0, x0 + 0.5], 1)
    lab = EpochLabels(
        0,
        batches,
        torch.arange(n) % batch,
        order,
        boxes,
        torch.rand(n, generator=g) < 0.5,
        3.0 * torch.randn(n, classes, generator=g),
    )
    rel = f"{fmt}-{n}.parquet"
    write_epoch(RunFS(tmp_path), rel, lab, fmt, k)  # type: ignore[arg-type]
    return os.path.getsize(tmp_path / rel)


def test_labels_epoch_bytes_near_a_written_epoch(tmp_path):
    cfg = demo_cfg()
    p = cfg.preset_obj()
    plan = P.make_plan(cfg)
    n = plan["shape"]["distilled_images"]
    planned = plan["disk"]["artifacts"]["labels"]["per_epoch"]
    written = _written_epoch(tmp_path, n, p.num_classes, cfg.labels.batch_size, cfg.labels.format)
    assert abs(planned - written) <= 0.2 * written
    assert plan["disk"]["artifacts"]["labels"]["bytes"] == cfg.labels.epochs * planned
    # Extrapolated from a few written batches to 10,000 rows (Tiny-ImageNet shape, IPC 50).
    for fmt in ("fp16", "topk"):
        planned = P.label_epoch_bytes(10_000, 200, fmt, 10, 64, budget=2**16)
        written = _written_epoch(tmp_path, 10_000, 200, 64, fmt)
        assert abs(planned - written) <= 0.05 * written, (fmt, planned, written)


def test_21k_batches_and_memory_independent_of_ipc():
    plans = {ipc: P.make_plan(in21k_cfg(ipc)) for ipc in (10, 40)}
    a, b = plans[10], plans[40]
    assert a["counts"]["synthesis"]["batches"] == 523  # ceil(10,450 x 10 / 200)
    assert a["train_images"]["count"] == P.KNOWN_TRAIN_IMAGES["imagenet-21k"]
    dn = b["shape"]["distilled_images"] - a["shape"]["distilled_images"]
    tiny = dn * EPOCH_INDEX_BYTES  # the per-image vectors (the largest kind), nothing else
    for stage in a["memory"]["stages"]:
        ma, mb = a["memory"]["stages"][stage], b["memory"]["stages"][stage]
        assert ma["gpu_peak"] == mb["gpu_peak"], stage
        assert 0 <= mb["host_peak"] - ma["host_peak"] <= tiny, stage
    # ...while the disk grows with the images
    da, db = a["disk"]["artifacts"], b["disk"]["artifacts"]
    assert db["synthesis_images"]["bytes"] == 4 * da["synthesis_images"]["bytes"]


def test_hours_are_work_flops_over_the_table_rate(tmp_path):
    cfg = demo_cfg()
    point = {k: {"flops_per_image": 1e8, "flops_per_s": 1e9} for k in P.WORK_KINDS}
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"device": "test", "points": [{"name": "x", "work": point}]}))
    plan = P.make_plan(cfg, throughput=table)
    f = P.facts_for(cfg, cfg.preset_obj().arch)
    c = plan["counts"]
    images = c["labels"]["labellers"] * c["labels"]["epochs"] * c["labels"]["images"]
    expected = images * f.flops["label_forward"] / 1e9 / 3600
    assert plan["hours"]["stages"]["labels"] == pytest.approx(expected)
    assert plan["hours"]["total"] == pytest.approx(sum(plan["hours"]["stages"].values()))


def test_saved_activations_on_meta_match_real_autograd(one_thread):
    """The meta device's count of saved bytes per image equals autograd's on real tensors
    (deduplicated by storage here, by tensor identity in the plan)."""

    def real_saved(model, x, grad_input):
        found: dict[int, int] = {}
        own = {p.data_ptr() for p in (*model.parameters(), *model.buffers())}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in own:
                found[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x.requires_grad_(grad_input))
        return sum(found.values())

    facts = P.model_facts("small_resnet", 10, 3, 16, True, 4)
    torch.manual_seed(0)
    model = build_model("small_resnet", 10, in_chans=3, low_res=True, width=4)
    for kind, attr, grad_input in (
        ("teacher_step", "saved_train", False),
        ("synthesis_iteration", "saved_input", True),
    ):
        P.prepare(kind, model)
        one, two = (real_saved(model, torch.randn(b, 3, 16, 16), grad_input) for b in (1, 2))
        assert getattr(facts, attr) == two - one, kind


def test_flops_on_meta_equal_flops_on_real_tensors(one_thread):
    """The plan counts on meta what the benchmark counts on real tensors."""
    facts = P.model_facts("small_resnet", 10, 1, 12, True, 4)
    model = build_model("small_resnet", 10, in_chans=1, low_res=True, width=4)
    from d3s_core.layers import select_layers

    layers = select_layers(model)
    x, y = torch.randn(2, 1, 12, 12), torch.tensor([0, 1])
    for kind in P.WORK_KINDS:
        assert P.count_flops(kind, model, x, y, layers) / 2 == facts.flops[kind], kind


def test_train_images_sources(tmp_path):
    cfg = demo_cfg()
    assert P.train_images(cfg, 123) == (123, "--train-images")
    synth = parse_config({"dataset": {"kind": "synthetic", "synthetic_size": 64}})
    from storage.datasets import stratified_split

    train, _ = stratified_split(torch.arange(64) % 10, 0.2, 0)  # synthetic_images' classes
    assert P.train_images(synth)[0] == len(train)
    tree = tmp_path / "train"
    for c in ("a", "b"):
        (tree / c).mkdir(parents=True)
        for i in range(3):
            (tree / c / f"{i}.JPEG").touch()
        (tree / c / "notes.txt").touch()
    folder = {"kind": "imagefolder", "path": str(tree), "val_path": str(tree)}
    assert P.train_images(parse_config({"dataset": folder}))[0] == 6
    gone = {"kind": "imagefolder", "path": str(tmp_path / "gone")}
    with pytest.raises(ValueError, match="--train-images"):
        P.train_images(parse_config({"dataset": gone}))


def test_cli_plan_prints_a_table_and_json(capsys):
    assert main(["plan", str(DEMO)]) == 0
    out = capsys.readouterr().out
    assert "stage" in out and "peak host" in out and "synthesis" in out and "ESTIMATE" in out
    assert main(["plan", str(DEMO), "--json", "--train-images", "1000"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["train_images"] == {"count": 1000, "source": "--train-images"}
    assert {r["stage"] for r in plan["stages"]} >= {"teachers", "stats", "synthesis", "labels"}
    assert main(["plan", str(DEMO), "--throughput", "/nonexistent.json"]) == 2


# -- the issue-15 stages: the hard protocol, the coreset baselines, the full-data reference ----
def extended_cfg(**validation):
    """The demo with every new stage: both protocols, both coresets, the full-data reference."""
    raw = json.loads(DEMO.read_text())
    raw["validation"].update(
        {
            "protocols": ["soft", "hard"],
            "coresets": ["herding", "k-center"],
            "full_data": True,
            "full_data_students": 2,
            **validation,
        }
    )
    return raw, parse_config(raw)


def test_new_stages_counts_disk_and_rows(tmp_path):
    raw, cfg = extended_cfg()
    p = cfg.preset_obj()
    teacher_epochs, student_epochs = epochs_of(raw, p)
    plan = P.make_plan(cfg, throughput=unit_table(tmp_path))
    c, art = plan["counts"], plan["disk"]["artifacts"]
    n_train, n = 4000, p.num_classes * raw["synthesis"]["ipc"]  # mnist5k at 0.2 held out
    lb, students = raw["labels"]["batch_size"], raw["validation"]["students"]
    assert [r["stage"] for r in plan["stages"]] == [
        "data",  # not estimated: no planner model
        "teachers",
        "stats",
        "synthesis",
        "labels",
        "validation",
        "validation_hard",
        "baseline_images",
        "baseline_labels",
        "baseline_validation",
        "baseline_validation_hard",
        "coresets",
        "coreset_labels",
        "coreset_validation",
        "coreset_validation_hard",
        "full_data",
    ]
    hard = {"students": students, "epochs": student_epochs, "steps_per_epoch": -(-n // lb)}
    for stage in ("validation_hard", "baseline_validation_hard", "coreset_validation_hard"):
        assert {k: c[stage][k] for k in hard} == hard, stage
        assert c[stage]["images"] == n
    assert c["coresets"]["images"] == n_train and c["coresets"]["sets"] == 2
    assert c["coreset_labels"]["epochs"] == raw["labels"]["epochs"]
    assert c["coreset_labels"]["batches_per_epoch"] == -(-n // lb)
    full = c["full_data"]
    assert (full["students"], full["epochs"], full["images"]) == (2, teacher_epochs, n_train)
    assert full["steps_per_epoch"] == -(-n_train // lb)  # 80 batches of 50
    assert full["students"] * full["epochs"] * full["steps_per_epoch"] == 2 * teacher_epochs * 80
    rows = {r["stage"]: r for r in plan["stages"]}
    assert rows["full_data"]["count"] == f"2 x {teacher_epochs} epochs x 80 steps"
    assert rows["coreset_validation_hard"]["count"].startswith("2 sets x 2 x ")
    # disk: two image stores like the random-real baseline's, their labels, every student
    chw = p.in_chans * p.image_size * p.image_size
    assert art["coreset_images"]["bytes"] == 2 * n * chw * 4
    assert art["coreset_labels"]["bytes"] == 2 * art["labels"]["bytes"]
    model = build_model(
        p.student.arch, p.num_classes, in_chans=p.in_chans, low_res=p.low_res, width=p.width
    )
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert art["student_weights_hard"]["bytes"] == students * weights
    assert art["coreset_student_weights_hard"]["bytes"] == 2 * students * weights
    assert art["full_data_student_weights"]["bytes"] == 2 * weights
    # hours: the work of each new stage over the table's rate (1e9 FLOP/s)
    tf, sf = P.facts_for(cfg, p.arch), P.facts_for(cfg, p.student.arch)
    h = plan["hours"]["stages"]
    per_student = student_epochs * n * sf.flops["student_step"] / 1e9 / 3600
    assert h["validation_hard"] == pytest.approx(students * per_student)
    assert h["coreset_validation_hard"] == pytest.approx(2 * students * per_student)
    assert h["coresets"] == pytest.approx(n_train * tf.flops["label_forward"] / 1e9 / 3600)
    expected = 2 * teacher_epochs * n_train * sf.flops["student_step"] / 1e9 / 3600
    assert h["full_data"] == pytest.approx(expected)
    assert plan["hours"]["total"] == pytest.approx(sum(h.values()))
    text = P.format_plan(plan)
    assert "full_data" in text and "label_forward (the same no-grad" in text


def test_new_stages_memory(tmp_path):
    _, cfg = extended_cfg()
    p = cfg.preset_obj()
    plan = P.make_plan(cfg)
    mem = plan["memory"]["stages"]
    # hard students: the soft working set without the label batch (host) and with 2 logit
    # copies instead of 6 (device)
    b, k = cfg.labels.batch_size, p.num_classes
    soft, hard = mem["validation"]["phases"]["train"], mem["validation_hard"]["phases"]["train"]
    assert sum(soft["device"].values()) - sum(hard["device"].values()) == b * k * 4 * (6 - 2)
    assert sum(soft["host"].values()) - sum(hard["host"].values()) == b * k * 4 * 3
    # the coreset pass holds one class's features: 400 images (500 less 0.2) x D, the input of
    # the teacher's last Linear, float32 + float64
    model = build_model(
        p.arch, p.num_classes, in_chans=p.in_chans, low_res=p.low_res, width=p.width
    )
    dim = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].in_features
    feats = plan["memory"]["coreset_features"]
    assert (feats["rows"], feats["dim"]) == (400, dim)
    device = mem["coresets"]["phases"]["pass"]["device"]
    assert f"one class's features (400 x {dim:,}: float32 + float64)" in device
    assert device[f"one class's features (400 x {dim:,}: float32 + float64)"] == 400 * dim * 12
    assert "write" in mem["coresets"]["phases"]
    # the full-data reference: teacher training's phases with the student and the hard logits
    full = mem["full_data"]["phases"]["train"]["device"]
    assert full["logits (student + grads)"] == b * k * 4 * 2
    assert "epoch permutation (int64)" in mem["full_data"]["phases"]["train"]["host"]


def test_hard_only_skips_labels_and_soft_students():
    _, cfg = extended_cfg(protocols=["hard"])
    plan = P.make_plan(cfg)
    stages = [r["stage"] for r in plan["stages"]]
    assert not [s for s in stages if s.endswith("labels") or s.endswith("validation")]
    for s in ("validation_hard", "baseline_validation_hard", "coreset_validation_hard"):
        assert s in stages
    art = plan["disk"]["artifacts"]
    assert "labels" not in art and "student_weights" not in art and "coreset_labels" not in art
    assert "full_data" in P.format_plan(plan)


def test_full_data_epochs_override():
    _, cfg = extended_cfg(full_data_epochs=3, full_data_students=1)
    full = P.make_plan(cfg)["counts"]["full_data"]
    assert (full["students"], full["epochs"], full["steps_per_epoch"]) == (1, 3, 80)


def test_imagenet_full_data_hours_with_a_table(tmp_path):
    cfg = parse_config(
        {
            "name": "in1k",
            "preset": "imagenet-1k",
            "device": "cuda",
            "dataset": {"kind": "imagefolder", "path": "/nonexistent/in1k/train"},
            "validation": {"full_data": True},
        }
    )
    plan = P.make_plan(cfg, throughput=unit_table(tmp_path, 1e12))
    n_train = P.KNOWN_TRAIN_IMAGES["imagenet-1k"]
    full = plan["counts"]["full_data"]
    epochs = cfg.teacher_train().epochs
    assert (full["students"], full["epochs"]) == (1, epochs)
    assert full["steps_per_epoch"] == -(-n_train // cfg.labels.batch_size)
    sf = P.facts_for(cfg, cfg.student_arch())
    expected = epochs * n_train * sf.flops["student_step"] / 1e12 / 3600
    got = plan["hours"]["stages"]["full_data"]
    assert got == pytest.approx(expected) and got > 1  # hours at ImageNet size
    row = next(line for line in P.format_plan(plan).splitlines() if line.startswith("full_data"))
    assert row.endswith(P.human_hours(got))
