"""The `d3s` command.

d3s run [CONFIG | --preset NAME] [--root URI] [--repair]
                                                the whole flow (Prefect), resumable
d3s status ROOT                                 what is done, what is in progress, how far
d3s verify ROOT [--quick]                       every artifact against the manifest
d3s repair ROOT [--dry-run]                     forget damaged artifacts and what depends on
                                                them, so the next run recomputes exactly that
d3s study CONFIG [--root URI]                   a study (Prefect): variants, Fig. 4, report
d3s plan CONFIG [--train-images N] [--throughput FILE] [--json]
                                                what a run will need (counts, disk, memory,
                                                estimated hours), before it starts
d3s teachers|stats|synthesis|labels|validation CONFIG --root URI
                                                one stage, without Prefect
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from flows.errors import report_os_error
from storage.config import RunConfig, load_config, parse_config
from storage.fs import RunFS
from storage.manifest import Manifest
from storage.run import (
    SYN_CHECKPOINT,
    labels_epoch,
    open_run,
    student_dir,
    summary_of,
    teacher_weights,
)
from storage.states import has_state, load_state, state_meta
from tasks.credentials import storage_options
from tasks.terminal import TerminalProgress, bars_enabled


def _config(path: str | None, preset: str | None) -> RunConfig:
    if path:
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise SystemExit(f"d3s: config file {path} not found") from None
        except json.JSONDecodeError as e:
            raise SystemExit(f"d3s: {path} is not valid JSON ({e})") from None
        if preset:
            data["preset"] = preset
        return parse_config(data, path)
    return parse_config({"preset": preset or "demo-mnist", "name": f"d3s-{preset or 'demo-mnist'}"})


def _study(path: str, root: str | None) -> int:
    from storage.study import StudySpec, plan_study

    try:
        with open(path) as f:
            spec = StudySpec.model_validate(json.load(f))
    except FileNotFoundError:
        raise SystemExit(f"d3s: study file {path} not found") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"d3s: {path} is not valid JSON ({e})") from None
    plan_study(spec)  # a bad variant is an error before anything runs (or imports Prefect)
    from flows.study import study

    print(study(root=root or f"runs/{spec.name}", config=spec))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from tasks.plan import format_plan, make_plan

    if args.train_images is not None and args.train_images < 1:
        raise ValueError(f"--train-images: {args.train_images} must be >= 1")
    plan = make_plan(_config(args.config, args.preset), args.train_images, args.throughput)
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 0


def verify(root: str, quick: bool) -> int:
    """A table of every artifact of the manifest and its state; 1 if any is damaged."""
    from storage.integrity import check_one

    fs = RunFS(root)
    if not fs.exists("config.json"):
        raise SystemExit(f"d3s: {fs.url()} is not a run (no config.json)")
    entries = Manifest(fs).entries()
    bad = 0
    print(f"{'artifact':<52} {'stage':<11} state")
    for rel in sorted(entries):
        problem = check_one(fs, rel, entries[rel], quick)
        state = "ok" if problem is None else f"{problem.status.upper()}: {problem.detail}"
        bad += problem is not None
        print(f"{rel:<52} {entries[rel].get('stage', ''):<11} {state}")
    depth = "quick (fingerprints; hashed where they differ)" if quick else "full (every byte)"
    print(f"{len(entries)} artifacts, {bad} damaged or missing; check: {depth}")
    if bad:
        print(f"remedy: d3s repair {root}", file=sys.stderr)
    return 1 if bad else 0


def repair_cmd(root: str, dry_run: bool) -> int:
    """Forget damaged or missing artifacts and everything computed from them (full check)."""
    from storage.integrity import check, plan_repair, repair

    fs = RunFS(root)
    if not fs.exists("config.json"):
        raise SystemExit(f"d3s: {fs.url()} is not a run (no config.json)")
    cfg = load_config(fs)
    with open_run(root, cfg, **storage_options(cfg)) as run:
        problems, _ = check(run.fs, quick=False)
        plan = plan_repair(run.fs, problems)
        for p in problems:
            print(f"{p.status:<8} {p.rel}: {p.detail}")
        if not plan.forget:
            print("nothing to repair: every artifact matches the manifest")
            return 0
        verb = "would forget" if dry_run else "forgetting"
        for rel in plan.forget:
            print(f"{verb} {rel}")
        if plan.first_batch is not None:
            print(f"synthesis redoes batches from {plan.first_batch} (earlier batches kept)")
        if not dry_run:
            repair(run.fs, plan)
            print(f"done: run the same `d3s run` again to recompute {len(plan.forget)} artifact(s)")
    return 0


def status(root: str) -> dict[str, Any]:
    """A summary of a run's progress, read from its manifest and checkpoints."""
    fs = RunFS(root)
    if not fs.exists("config.json"):
        raise SystemExit(f"d3s: {fs.url()} is not a run (no config.json)")
    cfg = load_config(fs)
    done = Manifest(fs).entries()
    from storage.profile import describe_profile, describe_recipe, read_profile

    profile = read_profile(fs)
    k = profile["values"]["num_classes"] if profile else cfg.dataset.num_classes
    if k is None and cfg.dataset.kind in ("synthetic", "mnist5k"):
        k = cfg.preset_obj().num_classes if cfg.dataset.kind == "synthetic" else 10
    n_batches = -(-k * cfg.synthesis.ipc // cfg.synthesis.batch_size) if k else "?"
    committed = len([f for f in fs.listdir("synthesis/batches") if f.endswith(".json")])
    in_batch = None
    if has_state(fs, SYN_CHECKPOINT):  # the marker's metadata only, not the 345 MiB state
        meta = state_meta(fs, SYN_CHECKPOINT)
        if "iteration" in meta:
            iteration = int(meta["iteration"])
        elif "losses" in meta:  # older checkpoints: one loss per iteration done
            iteration = len(meta["losses"])
        else:
            iteration = int(load_state(fs, SYN_CHECKPOINT)[0]["iteration"])
        in_batch = {"batch": meta.get("batch"), "iteration": iteration}
    students = [
        s
        for s in range(cfg.validation.students)
        if f"{student_dir(cfg.student_arch(), s)}/metrics.json" in done
    ]
    return {
        "run": cfg.name,
        "root": fs.url(),
        "preset": cfg.preset,
        "data": describe_profile(profile) if profile else "not profiled yet (the first stage does)",
        "recipe": describe_recipe(cfg).removeprefix("recipe: "),
        "warnings": profile.get("warnings", []) if profile else [],
        "teachers": f"{sum(teacher_weights(m) in done for m in range(cfg.teachers.count))}"
        f"/{cfg.teachers.count}",
        "stats": f"{sum(f'stats.zarr/teacher_{m}' in done for m in range(cfg.teachers.count))}"
        f"/{cfg.teachers.count}"
        + "".join(
            f", teacher {m}: {n} shards on disk"
            for m in range(cfg.teachers.count)
            if (
                n := len(
                    [f for f in fs.listdir(f"stats_shards/teacher_{m}") if f.endswith(".json")]
                )
            )
        ),
        "synthesis": f"{committed}/{n_batches} batches"
        + (
            f", batch {in_batch['batch']} at iteration {in_batch['iteration']}/"
            f"{cfg.synthesis_cfg().iterations}"
            if in_batch
            else ""
        )
        + (" (done)" if "synthesis/images.zarr" in done else ""),
        "labels": f"{sum(labels_epoch(e) in done for e in range(cfg.labels.epochs))}"
        f"/{cfg.labels.epochs} epochs",
        "validation": f"{len(students)}/{cfg.validation.students} students"
        + (" (done)" if summary_of() in done else ""),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="d3s", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run or resume the whole flow")
    run.add_argument("config", nargs="?")
    run.add_argument("--preset")
    run.add_argument("--root")
    run.add_argument(
        "--repair",
        action="store_true",
        help="forget damaged artifacts (and what depends on them) and recompute them",
    )
    ve = sub.add_parser("verify", help="check every artifact of a run against its manifest")
    ve.add_argument("root")
    ve.add_argument("--quick", action="store_true", help="stat, hash only what changed")
    rp = sub.add_parser("repair", help="forget damaged artifacts so the next run redoes them")
    rp.add_argument("root")
    rp.add_argument("--dry-run", action="store_true", help="list what would be forgotten")
    sd = sub.add_parser("study", help="run or resume a study of variants (storage/study.py)")
    sd.add_argument("config")
    sd.add_argument("--root")
    st = sub.add_parser("status", help="progress of a run")
    st.add_argument("root")
    pl = sub.add_parser("plan", help="counts, disk, peak memory and estimated hours of a run")
    pl.add_argument("config", nargs="?")
    pl.add_argument("--preset")
    pl.add_argument("--train-images", type=int, help="training images (else known or counted)")
    pl.add_argument("--throughput", help="throughput table (default bench/throughput/cpu.json)")
    pl.add_argument("--json", action="store_true", help="the whole plan as JSON")
    from tasks.stages import STAGES

    for name in STAGES:
        sp = sub.add_parser(name, help=f"the {name} stage alone, without Prefect")
        sp.add_argument("config", nargs="?")
        sp.add_argument("--preset")
        sp.add_argument("--root", required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "status":
            for k, v in status(args.root).items():
                if isinstance(v, list):  # one line each, indented under the key
                    print(f"{k:<11} " + ("\n" + " " * 12).join(v) if v else f"{k:<11} none")
                else:
                    print(f"{k:<11} {v}")
            return 0
        if args.cmd == "verify":
            return verify(args.root, args.quick)
        if args.cmd == "repair":
            return repair_cmd(args.root, args.dry_run)
        if args.cmd == "study":
            return _study(args.config, args.root)
        if args.cmd == "plan":
            return _plan(args)
        cfg = _config(args.config, args.preset)
        root = args.root or f"runs/{cfg.name}"
        if args.cmd == "run":
            from flows.distill import distill

            print(distill(root=root, config=cfg, repair=args.repair))
            return 0
        bars = TerminalProgress() if bars_enabled() else None
        try:
            with open_run(root, cfg, **storage_options(cfg)) as r:
                result = STAGES[args.cmd](r, bars) if bars else STAGES[args.cmd](r)
        finally:
            if bars:
                bars.close()
        print(result)
        return 0
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"d3s: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # read-only root, no space, permission: one line naming the path
        return report_os_error(e)


if __name__ == "__main__":
    sys.exit(main())
