"""The `d3s` command.

d3s run [CONFIG | --preset NAME] [--root URI] [--repair]
                                                the whole flow (Prefect), resumable
d3s status ROOT                                 what is done, what is in progress, how far
d3s verify ROOT [--quick]                       every artifact against the manifest
d3s repair ROOT [--dry-run]                     forget damaged artifacts and what depends on
                                                them, so the next run recomputes exactly that
d3s study CONFIG [--root URI]                   a study (Prefect): variants, Fig. 4, report
d3s plan CONFIG [--train-images N] [--throughput FILE] [--root URI] [--no-data] [--json]
                                                what a run will need (counts, disk, memory,
                                                estimated hours), before it starts
d3s STAGE [CONFIG | --preset NAME] --root URI   one stage, without Prefect (data, teachers,
                                                stats, synthesis, labels, validation, ...:
                                                tasks/stage_table.py)
"""

from __future__ import annotations

# Nothing heavy at import time or while building the parser: `d3s --help` and every
# subcommand's --help answer without importing torch, Prefect or zarr (storage.config,
# storage.run, storage.states and tasks.* import torch through d3s_core). Each command imports
# what it needs when it runs; tests/test_cli_help.py checks sys.modules after --help.
import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

from flows.errors import report_os_error
from tasks.stage_table import stage, stages  # plain data: imports no runner

if TYPE_CHECKING:
    from storage.config import RunConfig
    from storage.fs import RunFS

CONFIG_HELP = (
    "the run's JSON config (a dataset, a preset and its settings; see docs/datasets.md and "
    "the example configs/demo-mnist.json); omitted: the preset's defaults"
)
PRESET_HELP = (
    "the preset (recipe) to use, e.g. demo-mnist (d3s_core/presets.py); overrides the "
    "config's \"preset\" (default: the config's, else demo-mnist)"
)
REPORT = "report/report.md"  # reporting.report.REPORT (not imported: matplotlib, torch)
ROOT_HELP = "the run's directory: a local path or an fsspec URL such as s3://bucket/runs/x"


def _config(path: str | None, preset: str | None) -> RunConfig:
    from storage.config import parse_config

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
    cfg = _config(args.config, args.preset)
    root = None if args.no_data else args.root or f"runs/{cfg.name}"
    plan = make_plan(cfg, args.train_images, args.throughput, root, not args.no_data)
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 0


def _open_fs(root: str) -> RunFS:
    from storage.fs import RunFS

    fs = RunFS(root)
    if not fs.exists("config.json"):
        raise SystemExit(f"d3s: {fs.url()} is not a run (no config.json)")
    return fs


def verify(root: str, quick: bool) -> int:
    """A table of every artifact of the manifest and its state; 1 if any is damaged."""
    from storage.integrity import check_one
    from storage.manifest import Manifest

    fs = _open_fs(root)
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
    from storage.config import load_config
    from storage.integrity import check, finish_pending_repair, plan_repair, repair
    from storage.manifest import BrokenManifest, Manifest
    from storage.run import open_run
    from tasks.credentials import storage_options

    fs = _open_fs(root)
    cfg = load_config(fs)
    with open_run(root, cfg, **storage_options(cfg)) as run:
        finished = finish_pending_repair(run.fs)
        if finished:
            print(f"finished an interrupted repair: forgot {len(finished)} artifact(s)")
        try:
            Manifest(run.fs).entries()
        except BrokenManifest as e:
            print(f"damaged  {str(e).split('; ')[0]}")
            if dry_run:
                print("would restore the manifest's previous generation, then check against it")
                return 0
            print(f"manifest.json: {Manifest(run.fs).restore_previous()}")
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
    """A summary of a run's progress (tasks/status.py: each stage's lines)."""
    from tasks.status import run_status

    return run_status(_open_fs(root))


def _mean_std(summary: dict[str, Any]) -> str:
    """ "85.3 ± 1.2 % (n = 2)", or "85.3 % (n = 1)": one student has no spread."""
    n = summary["students"]
    spread = f" ± {100 * summary['std']:.1f}" if n > 1 else ""
    return f"{100 * summary['mean']:.1f}{spread} % (n = {n})"


def headline(root: str, cfg: RunConfig) -> list[str]:
    """What `d3s run` prints when it ends: the report's path and the run's numbers."""
    from storage.fs import RunFS
    from storage.run import read_results
    from tasks.credentials import storage_options

    fs = RunFS(root, **storage_options(cfg))
    results = read_results(fs, cfg.teachers.count)
    accs = [t["held_out_top1"] for t in results["teachers"]]
    summary, base = results["summary"], results["baseline"]
    lines = [
        f"report      {fs.url(REPORT)}",
        f"teachers    held-out top-1 {100 * sum(accs) / len(accs):.1f} % "
        f"(mean of {len(accs)} teacher{'s' if len(accs) != 1 else ''})",
        f"students    held-out top-1 {_mean_std(summary)}, on "
        f"{summary['distilled_images']} distilled images",
    ]
    if base is not None:
        lines.append(
            f"baseline    held-out top-1 {_mean_std(base)}, on a random real subset of "
            f"{base['distilled_images']} images"
        )
    from reporting.scores import pct, run_accuracies, score_rows

    rows = score_rows(run_accuracies(fs))
    if len(rows) > 2:  # more than the distilled set and the random subset under one protocol
        lines.append("scores      top-1 / IOR vs random / HLR (hard protocol), mean ± std:")
        for r in rows:
            extra = "".join(
                f", {key} {pct(r[key], True)}" for key in ("ior", "hlr") if r[key] is not None
            )
            lines.append(f"  {r['set']:<18} {r['protocol']:<4} {pct(r['top1'])} %{extra}")
    return lines


def run_one_stage(name: str, root: str, cfg: RunConfig) -> int:
    """`d3s <stage>`: the stage's runner on the run, its log lines ("data: ...", "warning:
    ...") on stderr, its result (a URL, or a list of them) on stdout."""
    from storage.run import open_run
    from tasks.credentials import storage_options
    from tasks.terminal import TerminalProgress, bars_enabled

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_StageLogFormat())
    log = logging.getLogger("d3s")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    bars = TerminalProgress() if bars_enabled() else None
    try:
        with open_run(root, cfg, **storage_options(cfg)) as r:
            result = stage(name).run(r, bars)
    finally:
        log.removeHandler(handler)
        if bars:
            bars.close()
    print(result)
    return 0


class _StageLogFormat(logging.Formatter):
    """ "warning: <message>" for warnings and worse, the message alone below."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return f"{record.levelname.lower()}: {msg}" if record.levelno >= 30 else msg


def build_parser() -> argparse.ArgumentParser:
    """The `d3s` parser, every argument with its help; imports nothing heavy."""
    ap = argparse.ArgumentParser(
        prog="d3s", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run or resume the whole flow (Prefect)",
        description="Run or resume every stage of one run (Prefect flow); prints the report's "
        "path and the held-out accuracies when it ends.",
    )
    run.add_argument("config", nargs="?", help=CONFIG_HELP)
    run.add_argument("--preset", help=PRESET_HELP)
    run.add_argument("--root", help=ROOT_HELP + " (default: runs/<the config's name>)")
    run.add_argument(
        "--repair",
        action="store_true",
        help="forget damaged artifacts (and what depends on them) and recompute them",
    )
    st = sub.add_parser(
        "status",
        help="progress of a run",
        description="What is done, and how far the stage in progress is (teacher and epoch, "
        "statistics shards, synthesis batch and iteration, label epochs, student and epoch).",
    )
    st.add_argument("root", help=ROOT_HELP)
    ve = sub.add_parser("verify", help="check every artifact of a run against its manifest")
    ve.add_argument("root", help=ROOT_HELP)
    ve.add_argument(
        "--quick",
        action="store_true",
        help="compare each artifact's file count, bytes and modification time with the "
        "manifest; hash only those that differ (default: hash every byte)",
    )
    rp = sub.add_parser("repair", help="forget damaged artifacts so the next run redoes them")
    rp.add_argument("root", help=ROOT_HELP)
    rp.add_argument(
        "--dry-run", action="store_true", help="list what would be forgotten, forget nothing"
    )
    sd = sub.add_parser("study", help="run or resume a study of variants (storage/study.py)")
    sd.add_argument(
        "config", help="the study's JSON file (docs/study.md; e.g. configs/study-mnist.json)"
    )
    sd.add_argument("--root", help=ROOT_HELP + " (default: runs/<the study's name>)")
    pl = sub.add_parser("plan", help="counts, disk, peak memory and estimated hours of a run")
    pl.add_argument("config", nargs="?", help=CONFIG_HELP)
    pl.add_argument("--preset", help=PRESET_HELP)
    pl.add_argument("--train-images", type=int, help="training images (else the data's)")
    pl.add_argument(
        "--throughput",
        help="throughput table (default: the package's table of the config's device kind, "
        "tasks/plan/throughput/<cpu|cuda>.json)",
    )
    pl.add_argument(
        "--root",
        help=ROOT_HELP + ", whose data profile is read if it has one "
        "(default: runs/<the config's name>); else the data is measured as the run will",
    )
    pl.add_argument(
        "--no-data",
        action="store_true",
        help="read no data: the config's, the dataset kind's and the preset's values",
    )
    pl.add_argument("--json", action="store_true", help="the whole plan as JSON")
    for st_ in stages():
        sp = sub.add_parser(
            st_.name,
            help=f"the {st_.name} stage alone, without Prefect",
            description=f"{st_.doc[0].upper()}{st_.doc[1:]}: the {st_.name} stage alone, "
            "without Prefect (it resumes from its checkpoint and keeps what is finished).",
        )
        sp.add_argument("config", nargs="?", help=CONFIG_HELP)
        sp.add_argument("--preset", help=PRESET_HELP)
        sp.add_argument("--root", required=True, help=ROOT_HELP)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "status":
            for k, v in status(args.root).items():
                if isinstance(v, list):  # one line each, indented under the key
                    print(f"{k:<11} " + ("\n" + " " * 12).join(v) if v else f"{k:<11} none")
                else:
                    print(f"{k:<11} {v}" if len(k) < 12 else f"{k}: {v}")
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

            distill(root=root, config=cfg, repair=args.repair)  # the summary's URI
            print("\n".join(headline(root, cfg)))
            return 0
        return run_one_stage(args.cmd, root, cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"d3s: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # read-only root, no space, permission: one line naming the path
        return report_os_error(e)


if __name__ == "__main__":
    sys.exit(main())
