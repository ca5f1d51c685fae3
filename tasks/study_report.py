"""The study's report: `report/study.md` with `report/variants.png` (mean ± std top-1 per
variant) and `report/fig4.png` (the Fig. 4 view: accuracy vs labelled epochs and vs student
training epochs), plus `report/study.json` with every number. Everything is read back from
the cells' run roots; nothing is recomputed.
"""

from __future__ import annotations

import io
import time
from typing import Any

from matplotlib.figure import Figure

from storage.fs import RunFS
from storage.records import read_record, write_record
from storage.run import BASELINE, summary_of, teacher_meta
from storage.study import SHARED, StudyPlan, StudySpec, read_match, student_epochs

STUDY_MD = "report/study.md"
STUDY_JSON = "report/study.json"
VARIANTS_PNG = "report/variants.png"
FIG4_PNG = "report/fig4.png"
MATCH_PNG = "report/match.png"


def _summary(fs: RunFS, plan: StudyPlan, cell: str) -> dict[str, Any]:
    c = plan.cell(cell)
    prefix = BASELINE if c.kind == "random-real" else ""
    return read_record(fs, f"{c.root}/{summary_of(prefix)}")


def collect(fs: RunFS, plan: StudyPlan) -> dict[str, Any]:
    """Every variant's and sweep point's validation summary, keyed by name, from `fs` (the
    study root)."""
    teachers = [
        read_record(fs, f"{SHARED}/{teacher_meta(m)}")["held_out_top1"]
        for m in range(plan.shared.teachers.count)
    ]
    rows = []
    for v, cell in plan.variants.items():
        c, s = plan.cell(cell), _summary(fs, plan, cell)
        match = read_match(fs, c.images_from or c.name)
        rows.append(
            {
                "variant": v,
                "kind": c.kind,
                "cell": cell,
                "images": s["distilled_images"],
                "n": s["students"],
                "top1": s["top1"],
                "mean": s["mean"],
                "std": s["std"],
                "own_images": c.images_from is None,
                "kl_to_data": None if match is None else match["kl"],
                "teacher_top1": None if match is None else match["top1"],
                "teacher_confidence": None if match is None else match["confidence"],
            }
        )
    ref = next(r for r in rows if r["variant"] == plan.reference)
    real = next((r for r in rows if r["kind"] == "random-real"), None)
    for r in rows:
        r["delta_vs_reference"] = r["mean"] - ref["mean"]
        r["delta_vs_random_real"] = None if real is None else r["mean"] - real["mean"]
    sweeps = {}
    for sweep, points in plan.sweeps.items():
        sweeps[sweep] = []
        for value, cell in points:
            s, cfg = _summary(fs, plan, cell), plan.cell(cell).config
            sweeps[sweep].append(
                {
                    "value": value,
                    "cell": cell,
                    "label_epochs": cfg.labels.epochs,
                    "student_epochs": student_epochs(cfg),
                    "n": s["students"],
                    "top1": s["top1"],
                    "mean": s["mean"],
                    "std": s["std"],
                }
            )
    return {"teachers_top1": teachers, "variants": rows, "sweeps": sweeps}


def _png(fig: Figure) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def variants_png(rows: list[dict[str, Any]], reference: str) -> bytes:
    """One bar per variant: mean top-1 % with ± std error bars, the reference and the
    random-real baseline coloured apart."""
    fig = Figure(figsize=(max(5.0, 0.8 * len(rows) + 2), 4), dpi=100)
    ax = fig.subplots()
    colour = {
        r["variant"]: "tab:orange"
        if r["variant"] == reference
        else "tab:grey"
        if r["kind"] == "random-real"
        else "tab:blue"
        for r in rows
    }
    xs = range(len(rows))
    ax.bar(
        xs,
        [100 * r["mean"] for r in rows],
        yerr=[100 * r["std"] for r in rows],
        capsize=4,
        color=[colour[r["variant"]] for r in rows],
    )
    ax.set_xticks(list(xs), [r["variant"] for r in rows], rotation=30, ha="right")
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
        colour = (
            "tab:orange"
            if r["variant"] == reference
            else "tab:grey"
            if r["kind"] == "random-real"
            else "tab:blue"
        )
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


def study_markdown(spec: StudySpec, plan: StudyPlan, data: dict[str, Any], root_url: str) -> str:
    ref = plan.reference
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
        f"| variant | kind | images | n | top-1 % | Δ vs {ref} | Δ vs random real | "
        "KL to data | teachers' top-1 on set |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["variants"]:
        name = r["variant"] if r["cell"] == r["variant"] else f"{r['variant']} (= {r['cell']})"
        lines.append(
            f"| {name} | {r['kind']} | {r['images']} | {r['n']} | "
            f"{_spread(r['mean'], r['std'], r['n'])} | {_pct(r['delta_vs_reference'], True)} | "
            f"{_pct(r['delta_vs_random_real'], True)} | {_num(r['kl_to_data'], '.1f')} | "
            f"{_pct(r['teacher_top1'])} |"
        )
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
