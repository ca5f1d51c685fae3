"""What people read about a run's progress and results (issue 14): every stage reports at 0 %
as it starts, in a unit that says what is counted; the random-real baseline's progress says
so; every displayed count is 1-based; one student shows no spread; the per-layer KL table
names its layers and fits a page."""

import json

import pytest
import torch

import tasks.prefect_tasks as pt
from reporting.report import (
    KL_TABLE_BATCHES,
    batch_records,
    layer_kl_markdown,
    layer_kl_rows,
    layer_names,
    report_markdown,
    spread,
)
from reporting.study_report import _spread
from storage.config import parse_config
from storage.fs import RunFS
from storage.run import open_run
from tasks.stages import EXTRA_STAGES, STAGES
from tasks.terminal import Count, describe

from .configs import SMALL

TINY = {
    **SMALL,
    "name": "progress-cards",
    "labels": {"epochs": 2, "batch_size": 10},
    "validation": {"students": 2, "epochs": 2, "random_real_baseline": True},
}


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, stage, fraction, info):
        self.calls.append((stage, fraction, dict(info)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Every stage and the baseline on a tiny run, each with its own recording callback."""
    root = tmp_path_factory.mktemp("cards") / "run"
    torch.set_num_threads(1)
    calls = {}
    with open_run(root, parse_config(TINY)) as run:
        for name, fn in {**STAGES, **EXTRA_STAGES}.items():
            rec = Recorder()
            fn(run, rec)
            calls[name] = rec.calls
    return root, calls


UNITS = {  # the first call of each stage, on a fresh run
    "teachers": ("teachers", {"teacher": (1, 2), "epoch": (0, 1)}),
    "synthesis": ("synthesis", {"batch": (1, 1), "iteration": (0, 4)}),
    "labels": ("labels", {"epoch": (0, 2)}),
    "validation": ("validation", {"student": (1, 2), "epoch": (0, 2)}),
}


@pytest.mark.parametrize("stage", [*UNITS, "stats"])
def test_each_stage_reports_at_zero_with_its_unit(tiny_run, stage):
    _, calls = tiny_run
    name, fraction, info = calls[stage][0]
    assert fraction == 0.0
    if stage == "stats":
        assert name == "stats" and info["batch"].done == 0 and info["teachers"] == 2
        assert describe(info).startswith(f"batch 0 of {info['batch'].total}, teachers 2")
    else:
        assert (name, info) == UNITS[stage]
    fractions = [f for _, f, _ in calls[stage]]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(isinstance(v, (Count, float, int)) for _, _, i in calls[stage] for v in i.values())


def test_unit_text():
    text = describe({"teacher": Count(1, 2), "epoch": Count(0, 4)})
    assert text == "teacher 1 of 2, epoch 0 of 4"
    assert describe({"batch": Count(3, 523), "loss": 41.234}) == "batch 3 of 523, loss 41.23"


def test_displayed_epochs_are_one_based(tiny_run):
    _, calls = tiny_run
    for stage, total in (("teachers", 1), ("labels", 2), ("validation", 2)):
        shown = [i["epoch"] for _, _, i in calls[stage]]
        assert {e.done for e in shown} == set(range(total + 1)), stage  # 0 = before the first
        assert all(e.total == total for e in shown)
    # After each labelled epoch: its 1-based number (the files stay labels/epoch=0, =1).
    assert [i["epoch"] for _, _, i in calls["labels"][1:]] == [(1, 2), (2, 2)]
    students = [i["student"] for _, _, i in calls["validation"]]
    assert {s.done for s in students} == {1, 2} and all(s.total == 2 for s in students)
    teachers = [i["teacher"] for _, _, i in calls["teachers"]]
    assert {t.done for t in teachers} == {1, 2}


def test_baseline_progress_says_random_real_baseline(tiny_run):
    _, calls = tiny_run
    base = calls["baseline"]
    assert base[0] == ("baseline", 0.0, {"random-real baseline": "images"})
    assert all(stage == "baseline" for stage, _, _ in base)  # never labelled as labels/validation
    texts = [describe(info) for _, _, info in base]
    assert all(t.startswith("random-real baseline ") for t in texts)
    assert "random-real baseline labels, epoch 1 of 2" in texts
    assert "random-real baseline students, student 2 of 2, epoch 0 of 2" in texts
    fractions = [f for _, f, _ in base]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


class FakeArtifacts:
    def __init__(self, monkeypatch):
        self.events = []
        monkeypatch.setattr(pt, "create_progress_artifact", self.create)
        monkeypatch.setattr(pt, "update_progress_artifact", self.update)
        monkeypatch.setattr(pt, "get_run_logger", lambda: _Quiet())
        monkeypatch.setattr(pt, "bars_enabled", lambda: False)

    def create(self, progress, description):
        self.events.append(("create", progress, description))
        return "artifact-id"

    def update(self, artifact, progress, description):
        assert artifact == "artifact-id"
        self.events.append(("update", progress, description))


class _Quiet:
    def info(self, *a):
        pass


def test_prefect_progress_artifact_exists_at_zero_and_shows_the_unit(monkeypatch):
    art = FakeArtifacts(monkeypatch)
    progress = pt.PrefectProgress("teachers", every=3600)
    assert art.events == [("create", 0.0, "teachers: starting")]  # before any callback
    progress("teachers", 0.0, {"teacher": Count(1, 2), "epoch": Count(0, 4), "loss": 2.5})
    # The card's one line (about 38 characters in the v2 UI): counts as k/N, no loss.
    assert art.events[-1] == ("update", 0.0, "teachers: teacher 1/2, epoch 0/4")
    progress("teachers", 0.1, {"teacher": Count(1, 2), "epoch": Count(1, 4)})
    assert len(art.events) == 2  # throttled
    progress.finish()  # the stage returned short of 100 %
    assert art.events[-1] == ("update", 100.0, "teachers: done")


def test_prefect_progress_finish_keeps_the_last_text_at_100(monkeypatch):
    art = FakeArtifacts(monkeypatch)
    progress = pt.PrefectProgress("labels")
    progress("labels", 1.0, {"epoch": Count(2, 2)})
    progress.finish()
    assert art.events[-1] == ("update", 100.0, "labels: epoch 2/2")


def test_card_text_fits_the_v2_card_at_the_paper_scale():
    from tasks.terminal import card_line, card_text

    cards = {
        "teachers": {"teacher": Count(5, 5), "epoch": Count(90, 90), "loss": 1.23456},
        "stats": {"batch": Count(5005, 5005), "shard": Count(101, 101), "teachers": 5},
        "labels": {"epoch": Count(300, 300), "loss": 0.5},
        "validation": {"student": Count(5, 5), "epoch": Count(300, 300), "loss": 0.5},
        "synthesis": {"batch": Count(523, 523), "iteration": Count(1000, 1000), "loss": 9.9},
        "baseline": {"random-real baseline": "students", "student": Count(5, 5)},
    }
    for stage, info in cards.items():  # the v2 card showed 46-49 characters at 1440 px
        assert len(card_line(stage, info)) <= 44, (stage, card_line(stage, info))
        assert "loss" not in card_text(info)


def _summary(top1):
    return {
        "students": len(top1),
        "top1": top1,
        "mean": sum(top1) / len(top1),
        "std": 0.0 if len(top1) == 1 else 0.01,
        "distilled_images": 10,
    }


def test_one_student_shows_no_spread(tmp_path):
    assert spread(0.935, 0.0, 1) == _spread(0.935, 0.0, 1) == "93.5 (n = 1)"
    assert spread(0.935, 0.004, 3) == _spread(0.935, 0.004, 3) == "93.5 ± 0.4"
    teacher = {"arch": "small_resnet", "held_out_top1": 0.95, "source": "trained"}
    results = {"teachers": [teacher], "summary": _summary([0.935]), "baseline": _summary([0.8])}
    md = report_markdown(parse_config(SMALL), RunFS(tmp_path), results, [], 0)
    assert "**93.5 (n = 1)**" in md and "**80.0 (n = 1)**" in md
    assert "±" not in md and "standard deviation" not in md
    results["summary"] = _summary([0.93, 0.94])
    md = report_markdown(parse_config(SMALL), RunFS(tmp_path), results, [], 0)
    assert "**93.5 ± 1.0**" in md and "standard deviations D3S 1.0)" in md


def test_validation_table_has_no_std_for_one_student():
    rows = pt.validation_rows([("student", _summary([0.935])), ("random-real", _summary([0.8]))])
    assert [r["std"] for r in rows] == ["—", "—"]
    assert rows[0]["mean top1 %"] == 93.5 and rows[0]["n"] == 1
    rows = pt.validation_rows([("student", _summary([0.93, 0.94]))])
    assert rows[0]["std"] == 1.0


def _records(n_batches, n_layers, teachers=2):
    return [
        {
            "batch": b,
            "teacher": b % teachers,
            "final_loss": 1000.0 if b == 100 else float(b),  # batch 100: the highest
            "layer_kl": [0.1 * i for i in range(n_layers)],
            "ridge": {"configured": 1e-4, "max_used": 1e-4},
        }
        for b in range(1, n_batches + 1)
    ]


def test_layer_kl_table_names_every_layer_and_fits_a_page():
    names = {m: [f"stage{i}.conv" for i in range(17)] for m in range(2)}
    rows = layer_kl_rows(_records(523, 17), names)
    assert all(len(r) <= KL_TABLE_BATCHES + 1 for r in rows)  # layer column + batches
    assert [r["layer"] for r in rows] == ["teacher", "final loss", "ridge used", *names[0]]
    cols = list(rows[0])[1:]
    assert cols[0] == "batch 1" and cols[-1] == "batch 523" and len(cols) == KL_TABLE_BATCHES
    assert "batch 100" in cols
    assert rows[-1]["batch 1"] == 1.6
    # Unknown names (no stats.zarr): 1-based positions, still one row per layer.
    rows = layer_kl_rows(_records(3, 4), {})
    assert [r["layer"] for r in rows[3:]] == ["layer 1", "layer 2", "layer 3", "layer 4"]
    md = layer_kl_markdown(_records(3, 4), {})
    assert max(line.count("|") for line in md) == 5  # 4 columns


def test_layer_kl_table_of_a_run_uses_the_stats_layer_names(tiny_run):
    root, _ = tiny_run
    fs = RunFS(root)
    names = layer_names(fs, 2)
    stats_attrs = json.loads((root / "stats.zarr" / "teacher_0" / "zarr.json").read_text())
    assert names[0] == stats_attrs["attributes"]["layers"] and len(names[0]) > 1
    rows = layer_kl_rows(batch_records(fs), names)
    record = batch_records(fs)[0]
    assert [r["layer"] for r in rows[3:]] == names[record["teacher"]]
    assert len(rows) - 3 == len(record["layer_kl"])
