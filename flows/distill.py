"""The D3S flow: teachers -> statistics -> synthesis -> labels -> validation, each a Prefect
task around its stage runner. A new flow run with the same root and config reuses finished
stages (Prefect cache, and each runner's own check of the manifest) and resumes the unfinished
one from its checkpoint; so does `prefect flow-run retry` of a crashed run.
"""

from __future__ import annotations

import base64
import json

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from storage.config import RunConfig
from storage.fs import RunFS
from storage.run import open_run, read_results
from tasks.prefect_tasks import (
    baseline_task,
    labels_task,
    stats_task,
    synthesis_task,
    teachers_task,
    validation_task,
)


def _run_name() -> str:
    cfg = flow_run.parameters.get("config")
    cfg = cfg if isinstance(cfg, RunConfig) else RunConfig.model_validate(cfg or {})
    if cfg.name != RunConfig.model_fields["name"].default:
        return cfg.name  # e.g. distill-mnist5k-ipc10
    return f"d3s-{cfg.preset}-ipc{cfg.synthesis.ipc}"


@flow(name="d3s-distill", flow_run_name=_run_name, log_prints=True)
def distill(root: str = "runs/demo-mnist", config: RunConfig = RunConfig()) -> str:  # noqa: B008
    """Run (or resume) every D3S stage of one run. Returns the validation summary's URI."""
    c = config.model_dump(mode="json")
    # The flow holds the run's writer lock for its whole life (the tasks share it), and the
    # run exists before the first cache key is computed.
    with open_run(root, config):
        t = teachers_task(root, c)
        s = stats_task(root, c, wait_for=[t])
        syn = synthesis_task(root, c, wait_for=[s])
        lab = labels_task(root, c, wait_for=[syn])
        summary_uri = validation_task(root, c, wait_for=[lab])
        if config.validation.random_real_baseline:
            baseline_task(root, c, wait_for=[t])
        publish_summary(root, config)
    return summary_uri


def publish_summary(root: str, config: RunConfig) -> None:
    """Tables of teacher and student accuracy in the Prefect UI."""
    fs = RunFS(root)
    results = read_results(fs, config.teachers.count)
    summary, base = results["summary"], results["baseline"]
    rows = []
    for m, meta in enumerate(results["teachers"]):
        rows.append(
            {
                "model": f"teacher {m}",
                "arch": meta["arch"],
                "top1 %": round(100 * meta["held_out_top1"], 2),
            }
        )
    for i, acc in enumerate(summary["top1"]):
        rows.append(
            {
                "model": f"student {i}",
                "arch": config.student_arch(),
                "top1 %": round(100 * acc, 2),
            }
        )
    baseline_line = ""
    if base is not None:
        for i, acc in enumerate(base["top1"]):
            rows.append(
                {
                    "model": f"random-real student {i}",
                    "arch": rows[-1]["arch"],
                    "top1 %": round(100 * acc, 2),
                }
            )
        baseline_line = (
            f"\n\nrandom real subset ({base['distilled_images']} real images, same ensemble "
            f"labels, same students): **{100 * base['mean']:.1f} ± {100 * base['std']:.1f} %**"
        )
    create_table_artifact(rows, key="accuracy", description="held-out top-1")
    kl_rows = []
    for name in fs.listdir("synthesis/batches"):
        rec = json.loads(fs.read_bytes(f"synthesis/batches/{name}"))
        kl_rows.append(
            {
                "batch": rec["batch"],
                "teacher": rec["teacher"],
                "loss": round(rec["final_loss"], 3),
                **{f"L{i}": round(v, 3) for i, v in enumerate(rec["layer_kl"])},
            }
        )
    if kl_rows:
        create_table_artifact(
            kl_rows,
            key="synthesis-layer-kl",
            description="per-layer loss at the end of each synthesis batch",
        )
    # The bundled UI renders a data: URI inline, offline (an image artifact only stores a URL).
    grid = base64.b64encode(fs.read_bytes("synthesis/png/grid.png")).decode()
    create_markdown_artifact(
        f"# {config.name}\n\nstudents on {summary['distilled_images']} distilled images: "
        f"**{100 * summary['mean']:.1f} ± {100 * summary['std']:.1f} %** top-1 "
        f"(n = {summary['students']}){baseline_line}\n\nartifacts: `{fs.url()}`\n\n"
        f"distilled images, one row per class:\n\n![grid](data:image/png;base64,{grid})",
        key="summary",
    )
