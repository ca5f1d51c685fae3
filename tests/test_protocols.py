"""Issue 15: the hard-label protocol, the full-data reference and DD-Ranking's scores."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from d3s_core.augment import apply_crops, draw_crops
from d3s_core.scores import (
    Spread,
    hard_label_recovery,
    label_robust_score,
    paired_scores,
)
from d3s_core.students import train_hard_batches
from reporting.scores import markdown_table, run_accuracies, score_rows
from storage.config import parse_config
from storage.fs import RunFS
from storage.integrity import dependents
from storage.records import read_record, read_student_metrics
from storage.run import FULL_DATA, labels_epoch, open_run, student_dir, summary_of
from tasks.stages import EXTRA_STAGES, STAGES
from tasks.stages.common import data_splits

from .configs import SMALL

HARD = {
    **SMALL,
    "validation": {
        "students": 2,
        "epochs": 2,
        "checkpoint_every_epochs": 1,
        "protocols": ["soft", "hard"],
        "random_real_baseline": True,
        "full_data": True,
        "full_data_epochs": 1,
    },
}


# -- scores ---------------------------------------------------------------------------------
def test_label_robust_score_is_ddranking_formula_from_fractions():
    e = math.e
    # alpha = 0.5 * IOR - 0.5 * HLR; LRS = (e^alpha - e^-1) / (e - e^-1)
    for ior, hlr in ((0.0, 0.0), (0.05, 0.3), (-0.1, 0.02), (1.0, -1.0), (-1.0, 1.0)):
        a = 0.5 * ior - 0.5 * hlr
        want = (math.exp(a) - math.exp(-1)) / (e - math.exp(-1))
        assert label_robust_score(ior, hlr) == pytest.approx(want, abs=1e-15)
    assert label_robust_score(1.0, -1.0) == pytest.approx(1.0)  # the best possible set
    assert label_robust_score(-1.0, 1.0) == pytest.approx(0.0)  # the worst
    assert label_robust_score(0.2, 0.0, lam=1.0) == pytest.approx(
        (math.exp(0.2) - math.exp(-1)) / (e - math.exp(-1))
    )
    with pytest.raises(ValueError, match="lam"):
        label_robust_score(0.0, 0.0, lam=1.5)


def test_scores_pair_students_by_seed():
    s = paired_scores([0.90, 0.80, 0.85], [0.88, 0.84, 0.85], [0.97, 0.99, 0.98])
    assert s["ior"].mean == pytest.approx((0.02 - 0.04 + 0.0) / 3)
    assert s["ior"].std == pytest.approx(Spread.of([0.02, -0.04, 0.0]).std)
    assert s["hlr"].mean == pytest.approx((0.07 + 0.19 + 0.13) / 3)
    lrs = [label_robust_score(i, h) for i, h in ((0.02, 0.07), (-0.04, 0.19), (0.0, 0.13))]
    assert s["lrs"].mean == pytest.approx(sum(lrs) / 3)
    # One full-data student: its accuracy stands for every seed.
    one = paired_scores([0.90, 0.80], None, [0.95])
    assert one["hlr"].mean == pytest.approx(hard_label_recovery(0.95, 0.85))
    assert one["ior"] is None and one["lrs"] is None
    assert Spread.of([0.5]).std is None


def test_score_rows_and_table():
    accs = {
        "D3S (distilled)": {"soft": [0.93, 0.94], "hard": [0.60, 0.62]},
        "random real": {"soft": [0.95, 0.94], "hard": [0.70, 0.66]},
        "full training set": {"hard": [0.98]},
    }
    rows = {(r["set"], r["protocol"]): r for r in score_rows(accs)}
    assert rows[("D3S (distilled)", "soft")]["ior"].mean == pytest.approx(-0.01)
    assert rows[("D3S (distilled)", "soft")]["hlr"] is None  # HLR is a hard-label score
    d_hard = rows[("D3S (distilled)", "hard")]
    assert d_hard["ior"].mean == pytest.approx(-0.07)
    assert d_hard["hlr"].mean == pytest.approx(0.98 - 0.61)
    assert rows[("random real", "hard")]["ior"].mean == 0.0
    assert rows[("full training set", "hard")]["hlr"] is None
    table = "\n".join(markdown_table(list(rows.values())))
    assert "| D3S (distilled) | hard | 2 | 61.0 ± 1.4 | -7.0 ± 4.2 | +37.0 ± 1.4 |" in table


# -- the hard protocol's epoch ----------------------------------------------------------------
def test_hard_epoch_is_crop_flip_and_cross_entropy():
    """One step of `train_hard_batches` equals the step written out by hand (float64)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).double()
    ref = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).double()
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = train_hard_batches(model, opt, [(x, y)], torch.Generator().manual_seed(5), 0.5, True)

    boxes, flips = draw_crops(6, torch.Generator().manual_seed(5), (0.5, 1.0), True)
    want = F.cross_entropy(ref(apply_crops(x, boxes, flips)), y)
    want.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    assert loss == pytest.approx(float(want.detach()), abs=1e-12)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# -- stages -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hard_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    torch.set_num_threads(1)
    with open_run(root, parse_config(HARD)) as run:
        for name in ("data", "teachers", "stats", "synthesis"):
            STAGES[name](run)
        # The hard protocol reads no labels: it runs before (and without) the labels stage.
        EXTRA_STAGES["validation-hard"](run)
        hard_labels = [run.fs.exists(labels_epoch(e)) for e in range(2)]
        for name in ("labels", "validation"):
            STAGES[name](run)
        EXTRA_STAGES["baseline"](run)
        EXTRA_STAGES["full-data"](run)
        train, _, _ = data_splits(run)
        n_train = len(train)
    return root, hard_labels, n_train


def test_hard_protocol_runs_without_labels_and_records_its_students(hard_run):
    root, labelled_before, _ = hard_run
    assert labelled_before == [False, False]
    fs = RunFS(root)
    summary = read_record(fs, summary_of("", "hard"))
    assert summary["protocol"] == "hard" and summary["students"] == 2
    m = read_student_metrics(fs, "small_resnet", 1, "", "hard")
    assert m["protocol"] == "hard" and m["label_epochs"] is None and len(m["train_loss"]) == 2
    assert summary["top1"] == [
        read_student_metrics(fs, "small_resnet", s, "", "hard")["top1"] for s in range(2)
    ]
    # Soft and hard students are apart on disk, and the soft ones are unchanged in kind.
    assert read_student_metrics(fs, "small_resnet", 0)["protocol"] == "soft"
    assert student_dir("small_resnet", 0, "", "hard").startswith("validation-hard/")


def test_full_data_reference_trains_on_every_training_image(hard_run):
    root, _, n_train = hard_run
    fs = RunFS(root)
    summary = read_record(fs, summary_of(FULL_DATA, "hard"))
    assert summary["distilled_images"] == n_train and summary["students"] == 1
    m = read_student_metrics(fs, "small_resnet", 0, FULL_DATA, "hard")
    assert m["epochs"] == 1 and m["train_images"] == n_train
    accs = run_accuracies(fs)
    assert set(accs) == {"D3S (distilled)", "random real", "full training set"}
    assert set(accs["random real"]) == {"soft", "hard"}
    assert set(accs["full training set"]) == {"hard"}


def test_hard_student_resumes_to_the_uninterrupted_result(hard_run, tmp_path):
    """Killed after its first epoch (checkpoint every epoch), a hard student resumes to the
    same weights as the uninterrupted one (same process and threads)."""
    root, _, _ = hard_run
    import shutil

    work = tmp_path / "run"
    shutil.copytree(root, work)
    shutil.rmtree(work / "validation-hard")
    fs = RunFS(work)
    cfg = parse_config(HARD)

    class Stop(Exception):
        pass

    stages = []

    def stop_after_first_epoch(stage, fraction, info):
        stages.append(stage)
        if "loss" in info and info["epoch"].done == 1:
            raise Stop

    torch.set_num_threads(1)
    with open_run(work, cfg) as run:
        run.manifest.forget("validation-hard/")
        with pytest.raises(Stop):
            EXTRA_STAGES["validation-hard"](run, stop_after_first_epoch)
        EXTRA_STAGES["validation-hard"](run)
    assert stages and set(stages) == {"validation-hard"}  # its own progress card
    want = read_record(RunFS(root), summary_of("", "hard"))["top1"]
    assert read_record(fs, summary_of("", "hard"))["top1"] == want
    a = RunFS(root).read_bytes(f"{student_dir('small_resnet', 0, '', 'hard')}/weights.safetensors")
    assert fs.read_bytes(f"{student_dir('small_resnet', 0, '', 'hard')}/weights.safetensors") == a


def test_dependents_cover_the_new_artifacts():
    assert "validation-hard/" in dependents("synthesis/images.zarr")
    assert "baselines/herding/" in dependents("teachers/teacher_0.safetensors")
    assert "baselines/random-real/validation-hard/" in dependents(
        "baselines/random-real/images.zarr"
    )
    assert dependents("validation-hard/small_resnet-seed1/metrics.json") == [
        "validation-hard/small_resnet-seed1/",
        "validation-hard/summary.json",
    ]
    # Random real images do not depend on a teacher; a coreset's do.
    assert "baselines/random-real/images.zarr" not in dependents("teachers/teacher_0.json")


@pytest.mark.parametrize(
    ("validation", "message"),
    [
        ({"protocols": ["hard", "hard"]}, "lists an entry twice"),
        ({"protocols": []}, "protocols"),
        ({"protocols": ["kd"]}, "protocols"),
        ({"coresets": ["herding", "herding"]}, "lists an entry twice"),
        ({"coresets": ["kmeans"]}, "coresets"),
        ({"coreset_teacher": 2}, "coreset_teacher"),
        ({"full_data_epochs": 0}, "full_data_epochs"),
    ],
)
def test_bad_validation_settings_are_named(validation, message):
    with pytest.raises(ValueError, match=message):
        parse_config({**SMALL, "validation": {**SMALL["validation"], **validation}})
