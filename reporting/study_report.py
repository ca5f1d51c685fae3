"""The study's report: `report/study.md` with `report/variants.png` (mean ± std top-1 per
variant) and `report/fig4.png` (the Fig. 4 view: accuracy vs labelled epochs and vs student
training epochs), the scores table (every variant under every protocol, DD-Ranking's IOR, HLR
and LRS against the random-real and full-data variants: reporting/scores.py), plus
`report/study.json` with every number. The accuracies are read back from the cells' run roots;
only the scores are derived from them.
"""

from __future__ import annotations

import io
import time
from typing import Any

from matplotlib.figure import Figure

from reporting.scores import markdown_table, score_rows
from storage.fs import RunFS
from storage.records import read_record, write_record
from storage.run import summary_of, teacher_meta
from storage.study import SHARED, Cell, StudyPlan, StudySpec, read_match, student_epochs

STUDY_MD = "report/study.md"
STUDY_JSON = "report/study.json"
VARIANTS_PNG = "report/variants.png"
FIG4_PNG = "report/fig4.png"
MATCH_PNG = "report/match.png"


def _summaries(fs: RunFS, c: Cell) -> dict[str, dict[str, Any]]:
    """A cell's validation summary of each protocol it validates, by protocol (a missing one
    is an error naming the file: the cells are finished before the report)."""
    return {p: read_record(fs, f"{c.root}/{summary_of(c.prefix, p)}") for p in c.protocols}


def _primary(summaries: dict[str, Any]) -> str:
    """The protocol a variant's headline numbers are of: soft where it has it, else hard."""
    return "soft" if "soft" in summaries else "hard"


def _delta(q: dict[str, Any], other: dict[str, Any] | None, protocol: str) -> float | None:
    """q's mean minus `other`'s (a variant row) under the same protocol, None if it has none."""
    if other is None or protocol not in other["protocols"]:
        return None
    return q["mean"] - other["protocols"][protocol]["mean"]


def collect(fs: RunFS, plan: StudyPlan) -> dict[str, Any]:
    """Every variant's and sweep point's validation summaries, keyed by name, from `fs` (the
    study root), and the scores. A variant row's "images", "n", "top1", "mean", "std" and
    deltas are of its `protocol` (soft where it has it, else hard); "protocols" holds each
    protocol's."""
    teachers = [
        read_record(fs, f"{SHARED}/{teacher_meta(m)}")["held_out_top1"]
        for m in range(plan.shared.teachers.count)
    ]
    rows = []
    for v, cell in plan.variants.items():
        c = plan.cell(cell)
        summaries = _summaries(fs, c)
        protocols = {
            p: {
                "images": s["distilled_images"],
                "n": s["students"],
                "top1": s["top1"],
                "mean": s["mean"],
                "std": s["std"],
            }
            for p, s in summaries.items()
        }
        primary = _primary(summaries)
        match = read_match(fs, c.images_from or c.name) if c.has_images else None
        rows.append(
            {
                "variant": v,
                "kind": c.kind,
                "cell": cell,
                "protocol": primary,
                **{k: protocols[primary][k] for k in ("images", "n", "top1", "mean", "std")},
                "protocols": protocols,
                "own_images": c.images_from is None and c.has_images,
                "kl_to_data": None if match is None else match["kl"],
                "teacher_top1": None if match is None else match["top1"],
                "teacher_confidence": None if match is None else match["confidence"],
            }
        )
    ref = next(r for r in rows if r["variant"] == plan.reference)
    real = next((r for r in rows if r["kind"] == "random-real"), None)
    full = next((r for r in rows if r["kind"] == "full-data"), None)
    for r in rows:
        for p, q in r["protocols"].items():
            q["delta_vs_reference"] = _delta(q, ref, p)
            q["delta_vs_random_real"] = _delta(q, real, p)
        for k in ("delta_vs_reference", "delta_vs_random_real"):
            r[k] = r["protocols"][r["protocol"]][k]
    sweeps: dict[str, list[dict[str, Any]]] = {}
    for sweep, points in plan.sweeps.items():
        sweeps[sweep] = []
        for value, cell in points:
            c = plan.cell(cell)
            summaries = _summaries(fs, c)
            primary = _primary(summaries)
            s, cfg = summaries[primary], c.config
            sweeps[sweep].append(
                {
                    "value": value,
                    "cell": cell,
                    "label_epochs": cfg.labels.epochs,
                    "student_epochs": student_epochs(cfg),
                    "protocol": primary,
                    "n": s["students"],
                    "top1": s["top1"],
                    "mean": s["mean"],
                    "std": s["std"],
                }
            )
    data: dict[str, Any] = {"teachers_top1": teachers, "variants": rows, "sweeps": sweeps}
    data["scores"] = {
        "random": None if real is None else real["variant"],
        "full": None if full is None else full["variant"],
    }
    data["scores"]["rows"] = [_score_json(r) for r in score_rows_of(data)]
    return data


def score_rows_of(data: dict[str, Any]) -> list[dict[str, Any]]:
    """reporting/scores.py's rows (Spreads) for the collected numbers: every variant under every
    protocol it has, IOR against the random-real variant, HLR and LRS against the full-data
    variant (data["scores"]["random"], ["full"]; None where the study has none)."""
    accs = {
        r["variant"]: {p: q["top1"] for p, q in r["protocols"].items()} for r in data["variants"]
    }
    refs = data["scores"]
    return score_rows(accs, random=refs["random"], full=refs["full"])


def _score_json(row: dict[str, Any]) -> dict[str, Any]:
    """A score row for study.json: each Spread as {"mean", "std", "n"} (None where no score)."""

    def spread(x: Any) -> dict[str, Any] | None:
        return None if x is None else {"mean": x.mean, "std": x.std, "n": x.n}

    return {
        "variant": row["set"],
        "protocol": row["protocol"],
        **{k: spread(row[k]) for k in ("top1", "ior", "hlr", "lrs")},
    }


def _png(fig: Figure) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


_COLOURS = {"random-real": "tab:grey", "herding": "tab:green", "k-center": "tab:olive"}
_COLOURS["full-data"] = "tab:red"


def _colour(r: dict[str, Any], reference: str) -> str:
    """The reference orange, distilled variants blue, each baseline kind its own colour."""
    return "tab:orange" if r["variant"] == reference else _COLOURS.get(r["kind"], "tab:blue")


def variants_png(rows: list[dict[str, Any]], reference: str) -> bytes:
    """One bar per variant: mean top-1 % with ± std error bars (soft protocol where the
    variant has it, else hard, marked so), the reference and each baseline kind coloured
    apart."""
    fig = Figure(figsize=(max(5.0, 0.8 * len(rows) + 2), 4), dpi=100)
    ax = fig.subplots()
    colour = {r["variant"]: _colour(r, reference) for r in rows}
    xs = range(len(rows))
    ax.bar(
        xs,
        [100 * r["mean"] for r in rows],
        yerr=[100 * r["std"] for r in rows],
        capsize=4,
        color=[colour[r["variant"]] for r in rows],
    )
    names = [r["variant"] + (" (hard)" if r.get("protocol") == "hard" else "") for r in rows]
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    lo = min(100 * (r["mean"] - r["std"]) for r in rows)
    ax.set_ylim(max(0.0, lo - 5), min(100.0, max(100 * (r["mean"] + r["std"]) for r in rows) + 2))
    ax.set(ylabel="held-out top-1 %", title="students per variant (mean ± std)")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def fig4_png(sweeps: dict[str, list[dict[str, Any]]]) -> bytes:
    """Fig. 4: accuracy vs labelled epochs (student epochs fixed) and vs student training
    epochs (labelled epochs fixed), mean ± std over students."""
    fig = Figure(figsize=(10, 3.8), dpi=100)
    axes = fig.subplots(1, 2)
    panels = [
        ("label_epochs", "labelled epochs", "student_epochs", "student epochs"),
        ("student_epochs", "student training epochs", "label_epochs", "labelled epochs"),
    ]
    for ax, (sweep, xlabel, fixed, fixed_name) in zip(axes, panels, strict=True):
        points = sweeps.get(sweep, [])
        if points:
            ax.errorbar(
                [p["value"] for p in points],
                [100 * p["mean"] for p in points],
                yerr=[100 * p["std"] for p in points],
                marker="o",
                capsize=4,
            )
            ax.set_xticks([p["value"] for p in points])
            ax.set_title(f"top-1 vs {xlabel} ({fixed_name}: {points[0][fixed]})", fontsize=10)
        else:
            ax.set_title(f"top-1 vs {xlabel} (not run)")
        ax.set(xlabel=xlabel, ylabel="held-out top-1 %")
        ax.grid(alpha=0.3)
    return _png(fig)


def match_png(rows: list[dict[str, Any]], reference: str) -> bytes | None:
    """Students' top-1 against how far each image set's feature Gaussians are from the full
    data's (Eq. 1 of the whole set, mean over teachers; log scale), one point per variant with
    its own images (variants that only relabel another's images are left out)."""
    pts = [r for r in rows if r["kl_to_data"] is not None and r["own_images"]]
    if not pts:
        return None
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    for r in pts:
        colour = _colour(r, reference)
        ax.errorbar(
            r["kl_to_data"], 100 * r["mean"], yerr=100 * r["std"], fmt="o", color=colour, capsize=3
        )
        ax.annotate(
            r["variant"],
            (r["kl_to_data"], 100 * r["mean"]),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set(
        xlabel="KL of the whole set to the full-data Gaussians (Eq. 1, sum over layers)",
        ylabel="students' held-out top-1 %",
        title="accuracy vs distribution match",
    )
    ax.grid(alpha=0.3)
    return _png(fig)


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _pct(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.1f}" if sign else f"{100 * x:.1f}"


def _spread(mean: float, std: float, n: int) -> str:
    """Mean top-1 % of n students: "93.5 ± 0.4"; one student has no spread: "93.5 (n = 1)"."""
    return f"{_pct(mean)} ± {_pct(std)}" if n > 1 else f"{_pct(mean)} (n = {n})"


def _protocol_spread(r: dict[str, Any], protocol: str) -> str:
    q = r["protocols"].get(protocol)
    return "-" if q is None else _spread(q["mean"], q["std"], q["n"])


def scores_markdown(data: dict[str, Any]) -> list[str]:
    """The "Scores (DD-Ranking)" section: every variant under every protocol, and what is
    missing for the scores the study cannot give."""
    refs, rows = data["scores"], score_rows_of(data)
    lines = ["## Scores (DD-Ranking)", ""]
    lines += markdown_table(rows)
    lines.append("")
    notes = [
        "IOR (improvement over random, percentage points, higher is better) compares each "
        "variant with the random-real variant under the same protocol, student seed by seed; "
        "HLR (hard-label recovery, lower is better) is the full-data reference's top-1 minus "
        "the variant's, hard protocol; LRS (label-robust score, in [0, 1]) combines the two."
    ]
    named = [
        f"{what} `{refs[k]}`"
        for k, what in (("random", "random real:"), ("full", "full data:"))
        if refs[k] is not None
    ]
    if named:
        notes.append(f"References: {', '.join(named)}.")
    if refs["random"] is None:
        notes.append(
            "This study has no variant of kind `random-real`, so there is no IOR and no LRS: "
            'add `{"kind": "random-real"}` to the variants.'
        )
    if refs["full"] is None:
        notes.append(
            "This study has no variant of kind `full-data`, so there is no HLR and no LRS: "
            'add `{"kind": "full-data"}` to the variants (students on the whole training set).'
        )
    elif not any(r["protocol"] == "hard" and r["set"] != refs["full"] for r in rows):
        notes.append(
            "No variant but the full-data reference is validated under the hard protocol, so "
            'there is no HLR and no LRS: add "hard" to `validation.protocols`.'
        )
    notes.append('Definitions, source and how to read them: docs/study.md, "Scores".')
    return [*lines, " ".join(notes), ""]


def study_markdown(spec: StudySpec, plan: StudyPlan, data: dict[str, Any], root_url: str) -> str:
    ref = plan.reference
    hard = any("hard" in r["protocols"] for r in data["variants"])
    teachers = ", ".join(f"{_pct(t)} %" for t in data["teachers_top1"])
    lines = [
        f"# D3S study `{spec.name}`",
        "",
        f"preset `{plan.shared.preset}`, IPC {plan.shared.synthesis.ipc}, "
        f"{plan.shared.teachers.count} teachers (held-out top-1 {teachers}), trained once in "
        f"`shared/` and shared by every variant; artifacts `{root_url}`; report written "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}.",
        "",
        "## Variants (held-out top-1 %, mean ± std over students)",
        "",
        f"| variant | kind | images | n | {'soft top-1 % | hard top-1 %' if hard else 'top-1 %'} "
        f"| Δ vs {ref} | Δ vs random real | KL to data | teachers' top-1 on set |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if hard else ""),
    ]
    for r in data["variants"]:
        name = r["variant"] if r["cell"] == r["variant"] else f"{r['variant']} (= {r['cell']})"
        top1 = (
            f"{_protocol_spread(r, 'soft')} | {_protocol_spread(r, 'hard')}"
            if hard
            else _spread(r["mean"], r["std"], r["n"])
        )
        lines.append(
            f"| {name} | {r['kind']} | {r['images']} | {r['n']} | {top1} | "
            f"{_pct(r['delta_vs_reference'], True)} | "
            f"{_pct(r['delta_vs_random_real'], True)} | {_num(r['kl_to_data'], '.1f')} | "
            f"{_pct(r['teacher_top1'])} |"
        )
    if hard:
        lines += [
            "",
            "**Soft**: students trained by knowledge distillation on the teachers' labels (the "
            "paper's protocol); **hard**: the same students on the class labels with "
            "cross-entropy. n and the Δ columns are of the soft protocol where the variant has "
            "it, else of the hard one; Δ compares under the same protocol only.",
        ]
    lines += ["", "![accuracy per variant](variants.png)", ""]
    if any(r["kl_to_data"] is not None for r in data["variants"]):
        lines += [
            "**KL to data**: Eq. 1 of each whole image set (no augmentation, statistics of all "
            "its images together) against the full-dataset Gaussians, summed over the measured "
            "layers, mean over the teachers; what synthesis minimises batch by batch. A random "
            "real subset's value is what real images of this size reach without optimisation. "
            "**Teachers' top-1 on set**: how many images the teachers assign to their class "
            "(the alpha * CE term's aim). Per teacher and per layer: `report/match/`.",
            "",
            "![accuracy vs distribution match](match.png)",
            "",
        ]
    lines += scores_markdown(data)
    lines += ["## Fig. 4: labelled epochs vs training epochs", ""]
    for sweep, title in (
        ("label_epochs", "labelled epochs"),
        ("student_epochs", "student training epochs"),
    ):
        points = data["sweeps"].get(sweep)
        if not points:
            continue
        lines += [
            f"Students of `{ref}` vs {title}:",
            "",
            "| labelled epochs | student epochs | n | top-1 % | run |",
            "|---|---|---|---|---|",
        ]
        for p in points:
            lines.append(
                f"| {p['label_epochs']} | {p['student_epochs']} | {p['n']} | "
                f"{_spread(p['mean'], p['std'], p['n'])} | `{p['cell']}` |"
            )
        lines.append("")
    lines += ["![Fig. 4](fig4.png)", "", "## Runs and what they reuse", ""]
    lines += ["| run | kind | images from | label epochs from |", "|---|---|---|---|"]
    for c in plan.cells:
        lines.append(
            f"| `variants/{c.name}` | {c.kind} | {c.images_from or '-'} | {c.labels_from or '-'} |"
        )
    lines.append("")
    return "\n".join(lines)


def write_study_report(fs: RunFS, spec: StudySpec, plan: StudyPlan) -> dict[str, Any]:
    """Write the report files under `fs` (the study root); returns the collected numbers."""
    data = collect(fs, plan)
    fs.write_bytes(VARIANTS_PNG, variants_png(data["variants"], plan.reference))
    fs.write_bytes(FIG4_PNG, fig4_png(data["sweeps"]))
    png = match_png(data["variants"], plan.reference)
    if png is not None:
        fs.write_bytes(MATCH_PNG, png)
    write_record(fs, STUDY_JSON, data)
    fs.write_bytes(STUDY_MD, study_markdown(spec, plan, data, fs.url()).encode())
    return data
