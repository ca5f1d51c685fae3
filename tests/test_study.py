"""`d3s study`: variants as subflows sharing teachers, statistics, images and label epochs
(nothing recomputed), the random-real and full-data baselines, both protocols, the Fig. 4
sweeps and the report (with the scores). Coreset kinds at the plan level:
tests/test_study_scores.py."""

import json

import pytest

from storage.fs import RunFS
from storage.manifest import Manifest
from storage.records import read_summary
from storage.run import BASELINE, FULL_DATA, SYN_IMAGES, labels_epoch, summary_of, teacher_weights
from storage.study import StudySpec, plan_study

from .configs import SMALL

STUDY = {
    "name": "tiny",
    "base": {**SMALL, "name": "base"},
    "students": 2,
    "variants": {
        "d3s": {},
        "diag": {"synthesis": {"params": {"loss": "kl_diag"}}},
        "labels-single": {"labels": {"teachers": "single"}},
        "random-real": {"kind": "random-real", "validation": {"protocols": ["soft", "hard"]}},
        "protocols": {"validation": {"protocols": ["soft", "hard"]}},  # d3s's images, relabelled
        "full-data": {"kind": "full-data"},
    },
    "label_epochs": [1, 2],  # 2 is the reference's own: the same run
    "student_epochs": [1, 2],  # 1 is the reference's own
}


def test_plan_shares_what_is_the_same():
    plan = plan_study(StudySpec.model_validate(STUDY))
    cells = {c.name: c for c in plan.cells}
    assert list(cells) == [
        "d3s",
        "diag",
        "labels-single",
        "random-real",
        "protocols",
        "full-data",
        "fig4-label-epochs-1",
        "fig4-student-epochs-2",
    ]
    assert plan.sweeps == {
        "label_epochs": [(1, "fig4-label-epochs-1"), (2, "d3s")],
        "student_epochs": [(1, "d3s"), (2, "fig4-student-epochs-2")],
    }
    assert (cells["diag"].images_from, cells["diag"].labels_from) == (None, None)
    assert (cells["labels-single"].images_from, cells["labels-single"].labels_from) == (
        "d3s",
        None,
    )
    for point in ("fig4-label-epochs-1", "fig4-student-epochs-2"):
        assert (cells[point].images_from, cells[point].labels_from) == ("d3s", "d3s")
    assert (cells["protocols"].images_from, cells["protocols"].labels_from) == ("d3s", "d3s")
    assert cells["fig4-label-epochs-1"].config.labels.epochs == 1
    assert all(c.config.validation.students == 2 for c in plan.cells)
    assert not any(c.config.validation.random_real_baseline for c in plan.cells)
    # Each cell runs its own kind's set only; the full-data reference is hard-protocol only.
    assert [c.name for c in plan.cells if c.config.validation.full_data] == ["full-data"]
    assert not any(c.config.validation.coresets for c in plan.cells)
    assert cells["full-data"].protocols == ["hard"] and not cells["full-data"].has_images
    assert cells["random-real"].protocols == ["soft", "hard"]
    assert not plan.shared.validation.full_data and not plan.shared.validation.coresets


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"teachers": {"count": 3}}, r"variant 'bad': overrides \['teachers'\].*'base'"),
        ({"stats": {"batch_size": 8}, "seed": 1}, r"overrides \['stats', 'seed'\]"),
        ({"synthesis": {"params": {"los": "kl"}}}, r"variant 'bad'.*unknown key.*los"),
        ({"synthesis": {"params": {"loss": "kl-diag"}}}, r"params.loss: .kl-diag. is not one of"),
        ({"kind": "random-real", "synthesis": {"ipc": 2}}, "has no synthesis"),
        ({"kind": "full-data", "synthesis": {}}, "'bad': a full-data baseline has no synthesis"),
        ({"kind": "other"}, "unknown kind"),
    ],
)
def test_bad_variant_is_rejected_naming_it(override, match):
    spec = StudySpec.model_validate({**STUDY, "variants": {"d3s": {}, "bad": override}})
    with pytest.raises(ValueError, match=match):
        plan_study(spec)


def test_cli_rejects_a_bad_study_before_running(tmp_path, capsys):
    from flows.cli import main

    path = tmp_path / "study.json"
    path.write_text(json.dumps({**STUDY, "variants": {"d3s": {}, "x": {"dataset": {}}}}))
    assert main(["study", str(path), "--root", str(tmp_path / "root")]) == 2
    assert "variant 'x': overrides ['dataset']" in capsys.readouterr().err
    assert not (tmp_path / "root").exists()


def test_study_runs_with_shared_teachers_stats_images(prefect_server, tmp_path, monkeypatch):
    import tasks.stages.stats as stats_stage
    import tasks.stages.synthesis as syn_stage
    import tasks.stages.teachers as teacher_stage
    from flows.study import study

    calls = {"teacher": 0, "shard": 0, "batch": 0}

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(teacher_stage, "_train", counting("teacher", teacher_stage._train))
    real_shards = stats_stage.compute_shards

    def counting_shards(run, teachers, train, todo, *a, **k):  # (teacher, shard) pairs done
        calls["shard"] += sum(len(ms) for ms in todo.values())
        return real_shards(run, teachers, train, todo, *a, **k)

    monkeypatch.setattr(stats_stage, "compute_shards", counting_shards)
    monkeypatch.setattr(syn_stage, "init_state", counting("batch", syn_stage.init_state))
    spec = StudySpec.model_validate(STUDY)
    root = tmp_path / "study"
    state = study(root=str(root), config=spec, return_state=True)
    assert state.result().endswith("report/study.md")
    shards_per_teacher = calls["shard"] // 2
    assert shards_per_teacher >= 1
    # Teachers and statistics once (in shared/); images once for d3s, labels-single and the
    # Fig. 4 points, once for diag: one synthesis batch (IPC 1, 10 classes) each.
    assert calls == {"teacher": 2, "shard": 2 * shards_per_teacher, "batch": 2}
    shared = Manifest(RunFS(root / "shared")).entries()
    plan = plan_study(spec)
    for cell in plan.cells:
        done = Manifest(RunFS(root / cell.root)).entries()
        for m in range(2):
            assert done[teacher_weights(m)]["sha256"] == shared[teacher_weights(m)]["sha256"]
            assert done[teacher_weights(m)]["copied_from"].endswith(teacher_weights(m))
        if cell.kind == "d3s":
            assert (
                done["stats.zarr/teacher_0"]["sha256"] == shared["stats.zarr/teacher_0"]["sha256"]
            )
    images = {
        c.name: Manifest(RunFS(root / c.root)).entries()[SYN_IMAGES]["sha256"]
        for c in plan.cells
        if c.kind == "d3s"
    }
    assert len({images[n] for n in ("d3s", "labels-single", "fig4-label-epochs-1")}) == 1
    assert images["diag"] != images["d3s"]
    point = Manifest(RunFS(root / "variants/fig4-student-epochs-2")).entries()
    assert "copied_from" in point[labels_epoch(1)]  # label epochs shared too
    single = Manifest(RunFS(root / "variants/labels-single")).entries()
    assert "copied_from" not in single[labels_epoch(0)]  # other labelling: its own
    # The baselines: the random real subset under both protocols, the full-data reference's
    # students (hard protocol, on the whole training set) and no image set of its own.
    real = RunFS(root / "variants/random-real")
    assert real.exists(summary_of(BASELINE, "soft")) and real.exists(summary_of(BASELINE, "hard"))
    full = RunFS(root / "variants/full-data")
    assert read_summary(full, FULL_DATA, "hard")["distilled_images"] == 130  # 160 less held-out
    assert not full.exists(summary_of(FULL_DATA, "soft")) and not full.exists(SYN_IMAGES)
    # The report lists every variant and both sweeps; the plots exist.
    md = (root / "report" / "study.md").read_text()
    for v in STUDY["variants"]:
        assert f"| {v} |" in md
    assert "soft top-1 % | hard top-1 %" in md and "## Scores (DD-Ranking)" in md
    data = json.loads((root / "report" / "study.json").read_text())
    assert [p["value"] for p in data["sweeps"]["label_epochs"]] == [1, 2]
    by_name = {r["variant"]: r for r in data["variants"]}
    assert all(r["n"] == 2 for r in data["variants"] if r["kind"] != "full-data")
    assert (by_name["full-data"]["n"], by_name["full-data"]["protocol"]) == (1, "hard")
    assert sorted(by_name["protocols"]["protocols"]) == ["hard", "soft"]
    assert by_name["protocols"]["mean"] == by_name["protocols"]["protocols"]["soft"]["mean"]
    for png in ("variants.png", "fig4.png", "match.png"):
        assert (root / "report" / png).read_bytes()[:4] == b"\x89PNG"
    # Scores: every variant under every protocol it has; LRS where the set has hard students
    # and both references exist.
    assert data["scores"]["random"] == "random-real" and data["scores"]["full"] == "full-data"
    scores = {(r["variant"], r["protocol"]): r for r in data["scores"]["rows"]}
    assert set(scores) == {(v, p) for v, r in by_name.items() for p in r["protocols"]}
    assert scores[("protocols", "hard")]["lrs"] is not None
    assert scores[("d3s", "soft")]["ior"]["mean"] == pytest.approx(
        by_name["d3s"]["mean"] - by_name["random-real"]["mean"]
    )
    assert scores[("d3s", "soft")]["hlr"] is None  # HLR is of the hard protocol
    # Distribution match: measured once per distinct image set (fig4/labels-single reuse d3s's),
    # with the shared teachers, and in every row of a variant with images.
    measured = sorted(p.stem for p in (root / "report" / "match").glob("*.json"))
    assert measured == sorted(c.name for c in plan.cells if c.images_from is None and c.has_images)
    for r in data["variants"]:
        if r["kind"] == "full-data":
            assert r["kl_to_data"] is None
        else:
            assert r["kl_to_data"] > 0 and 0 <= r["teacher_top1"] <= 1
    assert by_name["labels-single"]["kl_to_data"] == by_name["d3s"]["kl_to_data"]
    assert by_name["diag"]["kl_to_data"] != by_name["d3s"]["kl_to_data"]
    match_files = {p.name: p.stat().st_mtime_ns for p in (root / "report" / "match").iterdir()}
    # The UI view: the report with both plots inline, and the table.
    import asyncio

    from prefect.client.orchestration import get_client

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts()

    flow_run = state.state_details.flow_run_id
    mine = {a.key: a for a in asyncio.run(artifacts()) if a.flow_run_id == flow_run and a.key}
    assert mine["study"].data.count("data:image/png;base64,") == 3
    table = json.loads(mine["study-variants"].data)
    assert [r["variant"] for r in table] == list(STUDY["variants"])
    assert [r["hard top1 %"] is not None for r in table] == [
        "hard" in by_name[v]["protocols"] for v in STUDY["variants"]
    ]
    assert {(r["image set"], r["protocol"]) for r in json.loads(mine["study-scores"].data)} == (
        set(scores)
    )
    # A second run of the same study recomputes nothing.
    before = dict(calls)
    study(root=str(root), config=spec)
    assert calls == before
    assert {p.name: p.stat().st_mtime_ns for p in (root / "report" / "match").iterdir()} == (
        match_files
    )
