"""The plan as text: the readable table and the notes behind it."""

from __future__ import annotations

from typing import Any


def count_text(stage: str, c: dict[str, dict[str, Any]]) -> str:
    x = c.get(stage.replace("baseline_images", "synthesis"), {})
    sets = f"{x['sets']} sets x " if "sets" in x else ""
    if stage == "coresets":
        return (
            f"{x['images']:,} images through teacher {x['teacher']}, "
            f"{x['sets']} sets of {x['set_images']:,}"
        )
    if stage == "teachers":
        if not x["trained"]:
            return f"{x['teachers']} imported"
        return f"{x['teachers']} x {x['epochs']} epochs x {x['steps_per_epoch']:,} steps"
    if stage == "stats":
        return f"{x['images']:,} images, {x['batches']:,} batches, {x['shards']:,} shards"
    if stage == "synthesis":
        return f"{x['batches']:,} batches x {x['iterations_per_batch']:,} iterations"
    if stage == "baseline_images":
        return f"{x['images']:,} real images"
    if stage.endswith("labels"):
        return f"{sets}{x['epochs']} epochs x {x['batches_per_epoch']:,} batches"
    return f"{sets}{x['students']} x {x['epochs']} epochs x {x['steps_per_epoch']:,} steps"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def human_hours(h: float | None) -> str:
    if h is None:
        return "?"
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.1f} min"
    return f"{h:.1f} h"


def data_lines(plan: dict[str, Any]) -> list[str]:
    """Where the class count, image count, channels and image size came from."""
    data, src = plan.get("data"), plan["shape"].get("sources")
    if not data or not src:
        return []
    shape = plan["shape"]
    values = {
        "classes": f"{shape['classes']:,}",
        "channels": str(shape["image"][0]),
        "image_size": f"{shape['image'][1]} px",
    }
    out = [f"data: {data['where']}"]
    for key, value in values.items():
        label = key.replace("_", " ")
        out.append(f"  {label:<10} {value:>7}  [{src[key]['how']}]")
    out += [f"  WARNING: {w}" for w in data.get("warnings", [])]
    return out + ([plan["recipe"]] if "recipe" in plan else [])


def format_plan(plan: dict[str, Any]) -> str:
    """The readable table and the notes behind it."""
    cfg, shape, tr = plan["config"], plan["shape"], plan["train_images"]
    lines = [
        f"plan for {cfg['name']} (preset {cfg['preset']}, device {cfg['device']}): "
        f"{shape['classes']:,} classes x IPC {shape['ipc']} = "
        f"{shape['distilled_images']:,} images of {'x'.join(map(str, shape['image']))}",
        f"training images: {tr['count']:,} ({tr['source']})",
        *data_lines(plan),
        "",
    ]
    missing = plan["hours"].get("missing")
    head = ("stage", "count", "disk", "peak host", "peak GPU", "hours")
    body = [
        (
            r["stage"],
            r["count"],
            human_bytes(r["disk_bytes"]),
            human_bytes(r["host_peak_bytes"]),
            human_bytes(r["gpu_peak_bytes"]),
            "no GPU table" if missing and r["hours"] is None else human_hours(r["hours"]),
        )
        for r in plan["stages"]
    ]
    t = plan["totals"]
    body.append(
        (
            "total",
            "",
            human_bytes(t["disk_bytes"]),
            human_bytes(t["host_peak_bytes"]),
            human_bytes(t["gpu_peak_bytes"]),
            missing if missing and t["hours"] is None else human_hours(t["hours"]),
        )
    )
    widths = [max(len(row[i]) for row in (head, *body)) for i in range(len(head))]
    for i, row in enumerate((head, *body)):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [v.rjust(w) for v, w in zip(row[2:], widths[2:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if i == 0 or i == len(body) - 1:
            lines.append("  ".join("-" * w for w in widths))
    if t.get("not_estimated"):
        lines.append(
            f"not estimated: {', '.join(t['not_estimated'])} (no planner model; the totals "
            "leave them out)"
        )
    d = plan["disk"]
    lines += ["", "disk per artifact (kept unless marked transient):"]
    wide = max(26, *map(len, d["artifacts"]))
    for name, a in d["artifacts"].items():
        mark = "" if a["kept"] else "  (transient)"
        lines.append(f"  {name:<{wide}} {human_bytes(a['bytes']):>11}  {a['formula']}{mark}")
    w = d["synthesis_writes"]
    per = w["checkpoints_per_batch"]
    lines.append(
        f"  synthesis writes: {human_bytes(w['bytes_per_checkpoint'])} per checkpoint x "
        + (f"{w['checkpoints']:,} checkpoints" if per is not None else "? checkpoints")
        + f" (checkpoint_seconds {w['checkpoint_seconds']:g}) + {w['isu_writes']:,} ISU states"
        + f" = {human_bytes(w['bytes_written'])}"
    )
    mem, th = plan["memory"], plan["throughput"]
    lines += [
        "",
        f"memory: process baseline {human_bytes(mem['baseline_rss_bytes'])} "
        f"({mem['baseline_source']})"
        + (
            f", CUDA context {human_bytes(mem['cuda_context_bytes'])}"
            if mem["cuda_context_bytes"]
            else ""
        )
        + "; per-stage working sets in --json (docs/plan.md)",
    ]
    if "coreset_features" in mem:
        f = mem["coreset_features"]
        lines.append(
            f"  coresets: one class's features at a time, {f['rows']:,} images "
            f"({f['rows_source']}) x D = {f['dim']:,} ({f['dim_source']})"
        )
    if th["file"]:
        used = ", ".join(f"{k} at {v}" for k, v in plan["hours"]["points"].items())
        lines.append(
            f"hours: an ESTIMATE from {th['file']} ({th['device']}, {th['machine']}, measured "
            f"{th['measured']}): work FLOPs / measured FLOP/s ({used}); data loading, "
            "checkpoint I/O and the KL's Cholesky factorisations are not in it"
        )
        if th["device"] and th["device"].split(":")[0] != cfg["device"].split(":")[0]:
            lines.append(
                f"WARNING: this run is on {cfg['device']}, the table was measured on "
                f"{th['device']}: pass --throughput with a table measured there"
            )
    elif missing:
        lines.append(
            f"hours: {missing} (no {th['looked_for']}; or pass --throughput FILE); "
            "not the CPU table's hours, which would be a GPU run's wrong by orders of magnitude"
        )
    else:
        lines.append("hours: no throughput table (bench/bench_throughput.py writes one)")
    # how the new stages' hours are counted, after the hours line (before any warning)
    at = next((i for i, x in enumerate(lines) if x.startswith("hours:")), len(lines)) + 1
    notes = plan["hours"].get("notes", {})
    lines[at:at] = [f"  {stage}: {note}" for stage, note in notes.items()]
    return "\n".join(lines)
