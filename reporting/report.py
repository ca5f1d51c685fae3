"""The run's report: `report/report.md` with `report/grid.png` (distilled images, one row per
class) and `report/curves.png` (teacher, synthesis and student loss curves), written beside
the artifacts. Everything in it is read back from the run's files; nothing is recomputed.

The report is derived: it is rewritten after every flow run and is not in the manifest.
"""

from __future__ import annotations

import base64
import io
import re
import statistics
import time
from typing import Any

import zarr
from matplotlib.figure import Figure

from reporting.scores import FULL, RANDOM, markdown_table, run_accuracies, score_rows
from storage.config import RunConfig
from storage.fs import RunFS
from storage.profile import describe_profile, describe_recipe, read_profile
from storage.records import batch_records, read_match, student_metrics
from storage.run import BASELINE, STATS, read_results
from tasks.stages.recipe import teacher_warnings
from tasks.stages.synthesis import GRID_CLASSES, GRID_IMAGES

REPORT = "report/report.md"
GRID = "report/grid.png"
CURVES = "report/curves.png"


TABLE_BATCHES = 20  # synthesis batches listed in the report and the Prefect table


def shown_batches(
    records: list[dict[str, Any]], limit: int = TABLE_BATCHES
) -> list[dict[str, Any]]:
    """At most `limit` batch records for a table a person reads: the first, the last, an even
    spread between, and the one with the highest final loss (523 rows at ImageNet-21K would
    bury it; every record stays in synthesis/batches/)."""
    if len(records) <= limit:
        return records
    picked = {round(i * (len(records) - 1) / (limit - 2)) for i in range(limit - 1)}
    worst = max(range(len(records)), key=lambda i: records[i]["final_loss"] or 0.0)
    return [records[i] for i in sorted(picked | {worst})]


KL_TABLE_BATCHES = 7  # batch columns of a per-layer table: with the layer column, 8 fit a page


def layer_names(fs: RunFS, teachers: int) -> dict[int, list[str]]:
    """Each teacher's measured layers (module names), from the attributes of stats.zarr's
    per-teacher groups (no array is read); teachers without statistics are left out."""
    if not fs.exists(STATS):
        return {}
    opts = None if fs.local else fs.storage_options or None
    root = zarr.open_group(fs.url(STATS), mode="r", storage_options=opts)  # type: ignore[arg-type]
    out = {}
    for m in range(teachers):
        try:
            out[m] = [str(n) for n in root[f"teacher_{m}"].attrs["layers"]]  # type: ignore[union-attr]
        except KeyError:
            continue
    return out


def layer_kl_rows(
    records: list[dict[str, Any]],
    names: dict[int, list[str]],
    limit: int = KL_TABLE_BATCHES,
) -> list[dict[str, Any]]:
    """The per-layer loss at the end of each synthesis batch as a table a person reads: one
    row per measured layer, named by its module (the batch's teacher's layers from
    stats.zarr; "layer i", 1-based, where they are unknown), one column per batch of a
    bounded selection (`shown_batches`, at most `limit`: first, last, a spread and the highest
    final loss), so the table stays `limit` + 1 columns wide whatever the model's depth or the
    batch count. The first rows: the batch's teacher, its final loss and the ridge used."""
    shown = [rec for rec in shown_batches(records, limit) if rec.get("layer_kl")]
    if not shown:
        return []
    cols = [f"batch {rec['batch']}" for rec in shown]
    rows: dict[str, dict[str, Any]] = {
        "teacher": {"layer": "teacher"},
        "final loss": {"layer": "final loss"},
        "ridge used": {"layer": "ridge used"},
    }
    for col, rec in zip(cols, shown, strict=True):
        rows["teacher"][col] = rec["teacher"] + 1  # 1-based for people
        loss = rec.get("final_loss")
        rows["final loss"][col] = "—" if loss is None else round(loss, 3)
        rows["ridge used"][col] = ridge_cell(rec, bold=False)
        known = names.get(rec["teacher"], [])
        for i, v in enumerate(rec["layer_kl"]):
            name = known[i] if i < len(known) else f"layer {i + 1}"
            rows.setdefault(name, {"layer": name})[col] = round(v, 3)
    return [{"layer": r["layer"], **{c: r.get(c, "—") for c in cols}} for r in rows.values()]


def layer_kl_markdown(records: list[dict[str, Any]], names: dict[int, list[str]]) -> list[str]:
    """`layer_kl_rows` as a markdown section."""
    rows = layer_kl_rows(records, names)
    if not rows:
        return []
    cols = list(rows[0])
    lines = [
        "### Per-layer loss at the end of a batch",
        "",
        f"At most {KL_TABLE_BATCHES} batches (first, last, a spread and the highest final "
        "loss); one row per measured layer of the batch's teacher; every record is in "
        "`synthesis/batches/`.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return lines + [""]


def _student_metrics(fs: RunFS, cfg: RunConfig, prefix: str) -> list[dict[str, Any]]:
    return student_metrics(fs, cfg.student_arch(), cfg.validation.students, prefix)


def curves_png(
    teachers: list[dict[str, Any]],
    batches: list[dict[str, Any]],
    students: list[dict[str, Any]],
    baseline: list[dict[str, Any]],
) -> bytes:
    """Three panels: teacher training loss per epoch, synthesis loss per iteration (one line a
    batch, log scale), student KD loss per epoch (D3S and the random-real baseline)."""
    fig = Figure(figsize=(13, 3.8), dpi=100)
    ax_t, ax_s, ax_v = fig.subplots(1, 3)
    for m, meta in enumerate(teachers):
        if meta.get("train_loss"):
            xs = range(1, len(meta["train_loss"]) + 1)
            ax_t.plot(xs, meta["train_loss"], marker="o", label=f"teacher {m + 1}")
    ax_t.set(title="teachers: training loss", xlabel="epoch", ylabel="cross-entropy")
    for rec in batches:
        if rec.get("loss_curve"):
            xs = range(1, len(rec["loss_curve"]) + 1)
            ax_s.plot(xs, rec["loss_curve"], lw=1, label=f"batch {rec['batch']}")
    ax_s.set(title="synthesis: loss per iteration", xlabel="iteration", ylabel="loss")
    if any(rec.get("loss_curve") and min(rec["loss_curve"]) > 0 for rec in batches):
        ax_s.set_yscale("log")
    for group, style, name in ((students, "-", "D3S"), (baseline, "--", "random real")):
        for met in group:
            if met.get("train_loss"):
                xs = range(1, len(met["train_loss"]) + 1)
                ax_v.plot(
                    xs,
                    met["train_loss"],
                    style,
                    marker="o" if len(xs) < 20 else None,
                    label=f"{name} student {met['seed'] + 1}",
                )
    ax_v.set(title="students: KD loss", xlabel="epoch", ylabel="loss")
    for ax in (ax_t, ax_s, ax_v):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def spread(mean: float, std: float, n: int) -> str:
    """Mean top-1 % of n students for a person: "93.5 ± 0.4"; with one student, which has no
    spread, "93.5 (n = 1)"."""
    return f"{_pct(mean)} ± {_pct(std)}" if n > 1 else f"{_pct(mean)} (n = {n})"


def match_markdown(match: dict[str, Any]) -> list[str]:
    """The distribution-match section: per image set, Eq. 1 of the whole set against each
    teacher's full-dataset Gaussians and the teachers' top-1 on it."""
    if not match:
        return []
    names = {
        "distilled": "distilled (D3S)",
        "random_real": "random real subset",
        "herding": "herding coreset",
        "k_center": "k-center coreset",
    }
    teachers = len(next(iter(match.values()))["teachers"])
    lines = [
        "## Distribution match",
        "",
        "| images | n | "
        + " | ".join(f"KL to data, teacher {m + 1}" for m in range(teachers))
        + " | teachers' top-1 on set % | confidence |",
        "|---|---|" + "---|" * teachers + "---|---|",
    ]
    for key, m in match.items():
        kls = " | ".join(f"{t['kl']:.2f}" for t in m["teachers"])
        lines.append(
            f"| {names.get(key, key)} | {m['images']} | {kls} | {_pct(m['top1'])} | "
            f"{m['confidence']:.3f} |"
        )
    lines += [
        "",
        "KL to data: Eq. 1 of the whole set (all its images together, no augmentation) "
        "against the teacher's full-dataset Gaussians, summed over the measured layers; what "
        "synthesis minimises batch by batch. A random real subset of the same size is the "
        "yardstick: a distilled set well above it has not converged (more iterations), one "
        "below it matches the data's statistics better than real images do.",
        "",
    ]
    return lines


def ridge_cell(rec: dict[str, Any], bold: bool = True) -> str:
    """The ridge a batch's Eq. 1 used on its synthetic-batch covariances: the configured one, or
    the largest escalated one (in bold for markdown) with the configured one and the step
    count; "—" for a record written before the ridge was recorded."""
    ridge = rec.get("ridge")
    if not ridge:
        return "—"
    if ridge["max_used"] <= ridge["configured"]:
        return f"{ridge['configured']:.3g}"
    steps = ridge.get("escalated_steps", 0)
    mark = "**" if bold else ""
    return (
        f"{mark}{ridge['max_used']:.3g}{mark} (configured {ridge['configured']:.3g}; "
        f"{steps} step{'s' if steps != 1 else ''})"
    )


def ridge_summary(batches: list[dict[str, Any]]) -> str:
    """One line: how many batches needed a larger ridge than configured (over all batches, not
    only the shown ones), and the full-dataset targets that did."""
    recorded = [rec for rec in batches if rec.get("ridge")]
    if not recorded:
        return "Ridge: not recorded (batches committed before the ridge was recorded)."
    escalated = [rec for rec in recorded if rec["ridge"]["max_used"] > rec["ridge"]["configured"]]
    configured = sorted({rec["ridge"]["configured"] for rec in recorded})
    line = (
        f"Ridge: {len(escalated)} of {len(recorded)} batches needed a larger ridge on the "
        "synthetic-batch covariance than the configured "
        + ", ".join(f"{r:.3g}" for r in configured)
    )
    if escalated:
        names = [str(rec["batch"]) for rec in escalated]
        more = f" and {len(names) - 10} more" if len(names) > 10 else ""
        largest = max(rec["ridge"]["max_used"] for rec in escalated)
        line += f" (largest {largest:.3g}; batches {', '.join(names[:10])}{more})"
    if len(recorded) < len(batches):
        line += f"; {len(batches) - len(recorded)} batches committed before it was recorded"
    targets: dict[str, float] = {}
    for rec in recorded:
        targets.update(rec["ridge"].get("escalated_targets", {}))
    if targets:
        line += "; full-dataset targets prepared with a larger ridge: " + ", ".join(
            f"{k} {v:.3g}" for k, v in sorted(targets.items())
        )
    return line + "."


def batches_markdown(batches: list[dict[str, Any]]) -> list[str]:
    """The synthesis-batches section: the shown batches' table and the ridge summary."""
    if not batches:
        return []
    shown = shown_batches(batches)
    lines = [
        "## Synthesis batches",
        "",
        f"{len(batches)} batches"
        + (
            f"; {len(shown)} shown (first, last, a spread and the highest final loss), "
            "all in `synthesis/batches/`."
            if len(shown) < len(batches)
            else "."
        ),
        "",
        ridge_summary(batches),
        "",
        "| batch | teacher | images | final loss | resumed from iteration | ridge used |",
        "|---|---|---|---|---|---|",
    ]
    for rec in shown:
        resumed = rec.get("resumed_from_iteration")
        lines.append(
            f"| {rec['batch']} | {rec['teacher'] + 1} | {rec['count']} | "
            f"{rec['final_loss']:.4g} | {'-' if resumed is None else resumed} | "
            f"{ridge_cell(rec)} |"
        )
    lines.append("")
    return lines


def _num_classes(fs: RunFS, cfg: RunConfig) -> int:
    profile = read_profile(fs)
    return int(profile["values"]["num_classes"]) if profile else cfg.preset_obj().num_classes


def data_markdown(fs: RunFS, cfg: RunConfig, teachers: list[dict[str, Any]]) -> list[str]:
    """The "Data and recipe" section: what the run took from its data, its config and its
    preset (dataset/profile.json), and the warnings where the recipe looks off for the data,
    the teachers' convergence included."""
    profile = read_profile(fs)
    lines = ["## Data and recipe", ""]
    if profile is None:  # a run from before data profiles: the preset's shape
        lines += [f"The preset {cfg.preset!r}'s data shape (no `dataset/profile.json`).", ""]
        k = cfg.preset_obj().num_classes
    else:
        lines += [f"- {line}" for line in describe_profile(profile)]
        k = int(profile["values"]["num_classes"])
    lines += [f"- {describe_recipe(cfg, profile['train_images'] if profile else None)}", ""]
    warnings = (profile or {}).get("warnings", []) + teacher_warnings(teachers, k)
    if warnings:
        lines += ["**Warnings** (the recipe looks off for this data):", ""]
        lines += [f"- {w}" for w in warnings] + [""]
    return lines


def scores_markdown(cfg: RunConfig, fs: RunFS) -> list[str]:
    """The "Scores" section: every image set the run validated under every protocol, with
    DD-Ranking's scores (reporting/scores.py); empty when the run validated only its distilled set
    under one protocol."""
    accs = run_accuracies(fs)
    if sum(len(v) for v in accs.values()) < 2:
        return []
    lines = [
        "## Scores (DD-Ranking)",
        "",
        "Students' held-out top-1 per image set and protocol, mean ± std over students "
        "(soft: knowledge distillation on the ensemble labels, the paper's protocol; hard: the "
        "same students on the class labels with cross-entropy). IOR: the set minus the random "
        "real subset, same protocol; HLR: the full-data reference minus the set, hard protocol "
        "(lower is better); LRS: DD-Ranking's label-robust score from both, in [0, 1]. Scores "
        "pair students by seed; differences in percentage points. Formulas and source: "
        'docs/study.md, "Scores".',
        "",
        *markdown_table(score_rows(accs)),
        "",
    ]
    if RANDOM not in accs:
        lines += ["IOR needs the random real subset: `validation.random_real_baseline: true`.", ""]
    if FULL not in accs and "hard" in cfg.validation.protocols:
        lines += ["HLR and LRS need the full-data reference: `validation.full_data: true`.", ""]
    return lines


def report_markdown(
    cfg: RunConfig,
    fs: RunFS,
    results: dict[str, Any],
    batches: list[dict[str, Any]],
    label_bytes: int,
    match: dict[str, Any] | None = None,
    layers: dict[int, list[str]] | None = None,
) -> str:
    summary, base = results["summary"], results["baseline"]
    lines = [
        f"# D3S run `{cfg.name}`",
        "",
        f"preset `{cfg.preset}`, IPC {cfg.synthesis.ipc}, {cfg.teachers.count} teachers, "
        f"artifacts `{fs.url()}`; report written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.",
        "",
    ]
    lines += data_markdown(fs, cfg, results["teachers"])
    lines += [
        "## Accuracy (held-out top-1)",
        "",
        "| model | arch | source | top-1 % | final train loss |",
        "|---|---|---|---|---|",
    ]
    for m, meta in enumerate(results["teachers"]):
        losses = meta.get("train_loss") or []
        lines.append(
            f"| teacher {m + 1} | {meta['arch']} | {meta.get('source', '')} | "
            f"{_pct(meta['held_out_top1'])} | {f'{losses[-1]:.3f}' if losses else '—'} |"
        )
    arch = cfg.student_arch()
    lines.append(
        f"| students on {summary['distilled_images']} distilled images (n = "
        f"{summary['students']}) | {arch} | D3S | "
        f"**{spread(summary['mean'], summary['std'], summary['students'])}** | |"
    )
    if base is not None:
        lines.append(
            f"| students on a random real subset, {base['distilled_images']} images, same "
            f"ensemble labels (n = {base['students']}) | {arch} | baseline | "
            f"**{spread(base['mean'], base['std'], base['students'])}** | |"
        )
    lines.append("")
    if base is not None:
        diff = 100 * (summary["mean"] - base["mean"])
        verdict = "above" if diff > 0 else "below" if diff < 0 else "equal to"
        groups = (("D3S", summary), ("random real", base))
        spreads = [f"{name} {_pct(s['std'])}" for name, s in groups if s["students"] > 1]
        lines += [
            f"Measured: D3S is {abs(diff):.1f} points {verdict} the random real subset "
            f"(means of {summary['students']} and {base['students']} students"
            + (f"; standard deviations {', '.join(spreads)}" if spreads else "")
            + ").",
            "",
        ]
    teacher_mean = statistics.mean(m["held_out_top1"] for m in results["teachers"])
    lines += [
        f"Mean teacher accuracy {_pct(teacher_mean)} %; students reach "
        f"{100 * summary['mean'] / teacher_mean:.0f} % of it.",
        "",
    ]
    lines += scores_markdown(cfg, fs)
    lines += match_markdown(match or {})
    lines += [
        "## Distilled images",
        "",
        "One row per shown class, at most "
        f"{GRID_CLASSES} classes spread over all {_num_classes(fs, cfg)} and "
        f"{GRID_IMAGES} images each ([grid.png](grid.png)); every image is in "
        "`synthesis/images.zarr`.",
        "",
        "![distilled images](grid.png)",
        "",
        "## Loss curves",
        "",
        "![loss curves](curves.png)",
        "",
    ]
    lines += batches_markdown(batches)
    lines += layer_kl_markdown(batches, layers or {})
    lines += [
        "## Labels",
        "",
        f"{cfg.labels.epochs} labelled epochs, format `{cfg.labels.format}`, "
        f"{label_bytes / 1e6:.2f} MB on disk.",
        "",
    ]
    return "\n".join(lines)


def write_report(fs: RunFS, cfg: RunConfig) -> str:
    """Write report/report.md, report/grid.png and report/curves.png; returns the report's URL.
    Needs a finished validation stage."""
    results = read_results(fs, cfg.teachers.count)
    batches = batch_records(fs)
    students = _student_metrics(fs, cfg, "")
    baseline = _student_metrics(fs, cfg, BASELINE) if results["baseline"] else []
    fs.write_bytes(GRID, fs.read_bytes("synthesis/png/grid.png"))
    fs.write_bytes(CURVES, curves_png(results["teachers"], batches, students, baseline))
    match = read_match(fs)
    layers = layer_names(fs, cfg.teachers.count)
    md = report_markdown(cfg, fs, results, batches, fs.tree_bytes("labels"), match, layers)
    fs.write_bytes(REPORT, md.encode())
    return fs.url(REPORT)


def inline_images(fs: RunFS, markdown: str) -> str:
    """The report with its PNGs as data: URIs (the Prefect UI renders those offline; an image
    artifact only stores a link)."""

    def sub(m: re.Match[str]) -> str:
        data = base64.b64encode(fs.read_bytes(f"report/{m.group(2)}")).decode()
        return f"![{m.group(1)}](data:image/png;base64,{data})"

    inlined = re.sub(r"!\[([^\]]*)\]\(([\w.-]+\.png)\)", sub, markdown)
    # Links to the report's own files mean nothing in the UI: keep their text only.
    return re.sub(r"(?<!!)\[([^\]]*)\]\(([\w.-]+\.png)\)", r"\1", inlined)
