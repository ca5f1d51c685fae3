"""A study's coreset and full-data baselines at the plan level (which cell runs what, what may
not be overridden, what is one run), and the study report's scores (DD-Ranking's IOR, HLR and
LRS) from fabricated cell summaries, checked against hand-computed values. No training."""

import json
import math
import statistics

import pytest

from reporting.study_report import STUDY_JSON, STUDY_MD, write_study_report
from storage.fs import RunFS
from storage.records import write_record, write_summary
from storage.run import teacher_meta
from storage.study import StudySpec, plan_study

from .configs import SMALL

BOTH = {"validation": {"protocols": ["soft", "hard"]}}


def spec_of(variants, **more):
    return StudySpec.model_validate(
        {"name": "scores", "base": {**SMALL, "name": "base"}, "variants": variants, **more}
    )


# -- the plan -------------------------------------------------------------------------------
def test_coreset_and_full_data_cells_run_their_own_baseline_only():
    plan = plan_study(
        spec_of(
            {
                "d3s": {},
                "herding": {"kind": "herding", **BOTH},
                "k-center": {"kind": "k-center", "validation": {"coreset_teacher": 1}},
                # switches a variant sets are the plan's: overridden, not obeyed
                "full": {"kind": "full-data", "validation": {"coresets": ["herding"]}},
                "real": {"kind": "random-real", "validation": {"full_data": True}},
            }
        )
    )
    cells = {c.name: c for c in plan.cells}
    assert list(cells) == ["d3s", "herding", "k-center", "full", "real"]
    v = {n: c.config.validation for n, c in cells.items()}
    assert [(n, v[n].coresets, v[n].full_data) for n in cells] == [
        ("d3s", [], False),
        ("herding", ["herding"], False),
        ("k-center", ["k-center"], False),
        ("full", [], True),
        ("real", [], False),
    ]
    assert not any(x.random_real_baseline for x in v.values())
    assert v["k-center"].coreset_teacher == 1
    assert cells["herding"].prefix == "baselines/herding/"
    assert cells["herding"].protocols == ["soft", "hard"]
    assert cells["k-center"].protocols == ["soft"]
    assert (cells["full"].protocols, cells["full"].has_images) == (["hard"], False)
    assert all(c.images_from is None and c.labels_from is None for c in plan.cells[1:])
    shared = plan.shared.validation
    assert (shared.random_real_baseline, shared.coresets, shared.full_data) == (False, [], False)


@pytest.mark.parametrize("kind", ["herding", "k-center", "full-data"])
def test_a_baseline_may_not_override_synthesis(kind):
    spec = spec_of({"d3s": {}, "base-line": {"kind": kind, "synthesis": {"ipc": 2}}})
    with pytest.raises(ValueError, match=f"variant 'base-line': a {kind} baseline has no synth"):
        plan_study(spec)


def test_a_coreset_may_not_be_the_reference():
    spec = spec_of({"h": {"kind": "herding"}}, reference="h")
    with pytest.raises(ValueError, match="reference variant must be of kind 'd3s'"):
        plan_study(spec)


def test_same_kind_and_config_is_one_run_other_kinds_are_not():
    plan = plan_study(
        spec_of(
            {
                "d3s": {},
                "herding": {"kind": "herding"},
                "herding-again": {"kind": "herding", "validation": {"students": 2}},  # SMALL: 1
                "herding-2": {"kind": "herding", "validation": {"students": 1}},  # = herding
                "k-center": {"kind": "k-center"},
                "real": {"kind": "random-real"},
                "full": {"kind": "full-data"},
                "full-again": {"kind": "full-data"},
            }
        )
    )
    assert [c.name for c in plan.cells] == [
        "d3s",
        "herding",
        "herding-again",
        "k-center",
        "real",
        "full",
    ]
    assert plan.variants["herding-2"] == "herding"
    assert plan.variants["full-again"] == "full"


# -- the report's scores --------------------------------------------------------------------
ACCS = {  # variant -> protocol -> students' top-1 (seed order)
    "d3s": {"soft": [0.60, 0.70], "hard": [0.40, 0.50]},
    "real": {"soft": [0.50, 0.40], "hard": [0.30, 0.20]},
    "herding": {"soft": [0.55, 0.45], "hard": [0.35, 0.25]},
    "full": {"hard": [0.90]},
}


def fabricate(root, variants, accs):
    """A finished study as the report reads it: teachers' metadata in shared/ and each cell's
    validation summaries (no training)."""
    spec = spec_of(variants, students=2)
    plan = plan_study(spec)
    fs = RunFS(root)
    for m in range(plan.shared.teachers.count):
        write_record(fs, f"shared/{teacher_meta(m)}", {"held_out_top1": 0.95})
    for c in plan.cells:
        assert sorted(c.protocols) == sorted(accs[c.name])
        for protocol, top1 in accs[c.name].items():
            summary = {
                "protocol": protocol,
                "students": len(top1),
                "top1": top1,
                "mean": statistics.mean(top1),
                "std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                "distilled_images": 160 if c.kind == "full-data" else 10,
            }
            write_summary(RunFS(root / c.root), summary, c.prefix, protocol)
    return spec, plan, fs


def lrs(ior, hlr):
    a = 0.5 * ior - 0.5 * hlr
    return (math.exp(a) - math.exp(-1)) / (math.e - math.exp(-1))


def test_report_scores_every_variant_under_every_protocol(tmp_path):
    variants = {
        "d3s": BOTH,
        "real": {"kind": "random-real", **BOTH},
        "herding": {"kind": "herding", **BOTH},
        "full": {"kind": "full-data"},
    }
    spec, plan, fs = fabricate(tmp_path, variants, ACCS)
    write_study_report(fs, spec, plan)
    data = json.loads((tmp_path / STUDY_JSON).read_text())
    assert (data["scores"]["random"], data["scores"]["full"]) == ("real", "full")
    got = {(r["variant"], r["protocol"]): r for r in data["scores"]["rows"]}
    assert list(got) == [
        ("d3s", "soft"),
        ("real", "soft"),
        ("herding", "soft"),
        ("d3s", "hard"),
        ("real", "hard"),
        ("herding", "hard"),
        ("full", "hard"),
    ]
    # IOR seed by seed against the random subset, same protocol: d3s soft 0.1, 0.3.
    d3s_soft = got[("d3s", "soft")]
    assert d3s_soft["ior"]["mean"] == pytest.approx(0.2)
    assert d3s_soft["ior"]["std"] == pytest.approx(statistics.stdev([0.1, 0.3]))
    assert d3s_soft["hlr"] is None and d3s_soft["lrs"] is None  # HLR: hard protocol only
    assert d3s_soft["top1"] == {
        "mean": pytest.approx(0.65),
        "std": pytest.approx(0.0707107),
        "n": 2,
    }
    # Hard: IOR 0.1, 0.3; HLR against the full-data reference's one student (0.9): 0.5, 0.4.
    d3s_hard = got[("d3s", "hard")]
    assert d3s_hard["ior"]["mean"] == pytest.approx(0.2)
    assert d3s_hard["hlr"]["mean"] == pytest.approx(0.45)
    assert d3s_hard["hlr"]["std"] == pytest.approx(statistics.stdev([0.5, 0.4]))
    assert d3s_hard["lrs"]["mean"] == pytest.approx((lrs(0.1, 0.5) + lrs(0.3, 0.4)) / 2)
    herding_hard = got[("herding", "hard")]  # IOR 0.05, 0.05; HLR 0.55, 0.65
    assert herding_hard["ior"]["mean"] == pytest.approx(0.05)
    assert herding_hard["hlr"]["mean"] == pytest.approx(0.6)
    assert herding_hard["lrs"]["mean"] == pytest.approx((lrs(0.05, 0.55) + lrs(0.05, 0.65)) / 2)
    assert got[("real", "soft")]["ior"]["mean"] == 0.0  # the random subset against itself
    assert got[("real", "hard")]["hlr"]["mean"] == pytest.approx(0.65)
    full = got[("full", "hard")]
    assert (full["ior"], full["hlr"], full["lrs"]) == (None, None, None)
    assert full["top1"] == {"mean": 0.9, "std": None, "n": 1}
    # The variant rows: soft numbers where the variant has them, else hard; each protocol's too.
    rows = {r["variant"]: r for r in data["variants"]}
    assert (rows["d3s"]["protocol"], rows["d3s"]["mean"]) == ("soft", pytest.approx(0.65))
    assert rows["d3s"]["protocols"]["hard"]["mean"] == pytest.approx(0.45)
    assert rows["herding"]["delta_vs_random_real"] == pytest.approx(0.05)
    assert rows["herding"]["protocols"]["hard"]["delta_vs_reference"] == pytest.approx(-0.15)
    assert (rows["full"]["protocol"], rows["full"]["n"], rows["full"]["images"]) == ("hard", 1, 160)
    assert rows["full"]["delta_vs_reference"] == pytest.approx(0.45)  # vs d3s, hard
    assert rows["full"]["delta_vs_random_real"] == pytest.approx(0.65)
    assert rows["full"]["kl_to_data"] is None and not rows["full"]["own_images"]
    md = (tmp_path / STUDY_MD).read_text()
    assert "| soft top-1 % | hard top-1 % |" in md
    assert "| full | full-data | 160 | 1 | - | 90.0 (n = 1) |" in md
    scores_md = md[md.index("## Scores (DD-Ranking)") :]
    assert "| d3s | hard | 2 | 45.0 ± 7.1 | +20.0 ± 14.1 | +45.0 ± 7.1 |" in scores_md
    assert 'docs/study.md, "Scores"' in scores_md
    assert "random real: `real`, full data: `full`" in scores_md
    assert "no variant of kind" not in scores_md


def test_report_says_which_scores_are_missing_and_why(tmp_path):
    variants = {"d3s": BOTH, "herding": {"kind": "herding", **BOTH}}
    accs = {k: ACCS[k] for k in variants}
    spec, plan, fs = fabricate(tmp_path, variants, accs)
    write_study_report(fs, spec, plan)
    data = json.loads((tmp_path / STUDY_JSON).read_text())
    assert (data["scores"]["random"], data["scores"]["full"]) == (None, None)
    assert len(data["scores"]["rows"]) == 4
    assert all(r[k] is None for r in data["scores"]["rows"] for k in ("ior", "hlr", "lrs"))
    assert all(r["delta_vs_random_real"] is None for r in data["variants"])
    md = (tmp_path / STUDY_MD).read_text()
    assert "no variant of kind `random-real`, so there is no IOR" in md
    assert "no variant of kind `full-data`, so there is no HLR" in md


def test_soft_only_study_keeps_its_table_and_names_the_missing_hard_protocol(tmp_path):
    variants = {"d3s": {}, "real": {"kind": "random-real"}, "full": {"kind": "full-data"}}
    accs = {"d3s": {"soft": [0.6, 0.7]}, "real": {"soft": [0.5, 0.4]}, "full": {"hard": [0.9]}}
    spec, plan, fs = fabricate(tmp_path, variants, accs)
    write_study_report(fs, spec, plan)
    data = json.loads((tmp_path / STUDY_JSON).read_text())
    rows = {r["variant"]: r for r in data["variants"]}
    assert rows["full"]["delta_vs_reference"] is None  # d3s has no hard students to compare
    md = (tmp_path / STUDY_MD).read_text()
    assert "| soft top-1 % | hard top-1 % |" in md  # the full-data reference is hard
    assert "No variant but the full-data reference is validated under the hard protocol" in md
