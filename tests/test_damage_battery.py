"""The corruption battery: every kind of artifact a finished run holds, each damaged three ways
(truncated, one byte flipped with size and modification time kept, deleted), in a copy of one
finished run. For each case, `d3s run` must fail with one `d3s: ` line that names the damaged
file (or its store, such as `.../synthesis/images.zarr`) and a remedy; the remedy the message
gives (`test_battery`), or `d3s run --repair` (`test_battery_run_repair`), followed by `d3s run`
must then finish the run to the same bytes as the undamaged one.

The battery is `slow` (90 cases: 15 kinds x 3 damages x 2 remedies); `test_issue_case` (a
truncated last image shard, a teacher with a byte flipped and its mtime kept, a manifest that is
not JSON) runs in the default tier.

Two kinds are derived from what the command line gives and are restored in place, by design:
`dataset/profile.json` (measured again from the data and the config) and `config.json` (written
again from the given configuration when its hash is the one the manifest recorded with every
write; another configuration is refused). For them `d3s run` exits 0 at once, with a warning
that names the file, and leaves the same bytes.

A finished run holds no ISU state and no checkpoint (synthesis removes its last ISU state once
the set is recorded; every checkpoint is removed when its unit is done): a damaged one during a
run is removed with a warning and its work redone (tests/test_synthesis_streaming.py).

Byte identity (`files`) covers every file of the run, except:
  - `manifest.json` and its previous generation `manifest.prev.json`: they record write times
    and fingerprints (mtimes), which differ per run;
  - `.lock*`: the writer lock, holding the writer's host, pid and time;
  - `report/`: `report.md` names the root and the time it was written, and the report is
    rewritten by every `d3s run`;
  - the `run_id` value in `config.json` (a fresh uuid per run, by design: it tells a run from a
    deleted and recreated one). The rest of `config.json` is compared byte for byte;
  - the `created` time in `dataset/index.json` (when the data was indexed) and its
    `self_sha256`, which covers it.
Two finished runs of this config into two roots, in one process, differ in these alone; the
synthesis PNGs (`synthesis/png/`), checkpoints, ISU state and batch records are identical, so
they are compared.

Set D3S_BATTERY_LOG=FILE to append one JSON line per case (the outcome matrix).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import torch

from flows.cli import main

from .configs import SMALL
from .helpers import flip_byte_keeping_stat, rgb_tree, run_files

# SMALL with two synthesis batches (a damaged second one is redone alone), the random-real and
# herding baselines.
CONFIG = {
    **SMALL,
    "name": "battery",
    "synthesis": {**SMALL["synthesis"], "ipc": 2},
    "validation": {**SMALL["validation"], "random_real_baseline": True, "coresets": ["herding"]},
}

RUN_ID = re.compile(rb'"run_id": "[0-9a-f]+"')
# The dataset index's creation time, and its own checksum, which covers it.
CREATED = re.compile(rb'"(created|self_sha256)": "[^"]*"')


def blanked(rel: str, data: bytes) -> bytes:
    """config.json with its run id blanked, dataset/index.json with its creation time and the
    checksum that covers it (module docstring)."""
    if rel == "config.json":
        return RUN_ID.sub(b'"run_id": ""', data)
    if rel == "dataset/index.json":
        return CREATED.sub(rb'"\1": ""', data)
    return data


def files(root) -> dict[str, str]:
    """{relative path: sha256} of every file of a run but the excluded ones (module docstring)."""
    return run_files(root, skip=("manifest.", ".lock", "report/"), blank=blanked)


def differences(got: dict[str, str], want: dict[str, str]) -> list[str]:
    return (
        [f"missing {k}" for k in sorted(set(want) - set(got))]
        + [f"extra {k}" for k in sorted(set(got) - set(want))]
        + [f"differs {k}" for k in sorted(k for k in set(got) & set(want) if got[k] != want[k])]
    )


# -- the artifact kinds: one representative file of each, picked from the finished run ---------
def last(pattern: str):
    def pick(root: Path) -> str:
        hits = sorted(p.relative_to(root).as_posix() for p in root.glob(pattern) if p.is_file())
        assert hits, f"no {pattern} in the finished run"
        return hits[-1]

    return pick


def fixed(rel: str):
    return lambda root: rel


KINDS = {
    "teacher_weights": fixed("teachers/teacher_0.safetensors"),
    "teacher_meta": fixed("teachers/teacher_0.json"),
    "stats_chunk": last("stats.zarr/teacher_0/layer_00/cov/c/*/*"),
    "image_shard": last("synthesis/images.zarr/images/c/*/0/0/0"),  # the last batch's
    "batch_record": last("synthesis/batches/batch_*.json"),
    "label_epoch": last("labels/epoch=*/part-0.parquet"),
    "student_weights": last("validation/*/weights.safetensors"),
    "student_metrics": last("validation/*/metrics.json"),
    "summary": fixed("validation/summary.json"),
    "baseline_images": last("baselines/random-real/images.zarr/images/c/*/0/0/0"),
    "baseline_labels": fixed("baselines/random-real/labels/epoch=0/part-0.parquet"),
    "coreset_selection": fixed("baselines/herding/images.zarr/train_indices/c/0"),
    "manifest": fixed("manifest.json"),
    "config": fixed("config.json"),
    "dataset_profile": fixed("dataset/profile.json"),
}
# The dataset index of an ImageFolder tree (a second finished run, `finished_folder`).
INDEX_KINDS = {
    "dataset_index": fixed("dataset/index.json"),
    "dataset_listing": fixed("dataset/train.arrow"),
}


# -- the damages -------------------------------------------------------------------------------
def truncated(data: bytes) -> bytes:
    """Without the last 100 bytes, or half the bytes where that is less."""
    return data[: len(data) - min(100, len(data) // 2)]


def truncate(path: Path) -> None:
    path.write_bytes(truncated(path.read_bytes()))


def flip(path: Path) -> None:
    """Bit rot: the middle byte inverted, size and modification time kept."""
    flip_byte_keeping_stat(path, path.stat().st_size // 2)


def delete(path: Path) -> None:
    path.unlink()


DAMAGES = {"truncate": truncate, "flip": flip, "delete": delete}
# Restored by `d3s run` itself (module docstring).
IN_PLACE = {"dataset_profile", "config", "dataset_index", "dataset_listing"}

CASES = [(k, d) for k in KINDS for d in DAMAGES]
INDEX_CASES = [(k, d, r) for k in INDEX_KINDS for d in DAMAGES for r in ("suggested", "run_repair")]
IDS = [f"{k}-{d}" for k, d in CASES]
ISSUE_CASES = [("image_shard", "truncate"), ("teacher_weights", "flip"), ("manifest", "truncate")]


# -- the machinery -----------------------------------------------------------------------------
@dataclass
class Outcome:
    case: str
    remedy_kind: str
    rel: str
    rc1: int | str | None = None
    named: bool = False
    message: str = ""
    remedy: str | None = None
    remedy_rc: int | str | None = None
    remedy_message: str = ""
    rc2: int | str | None = None
    message2: str = ""
    differ: list[str] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def problems(self) -> list[str]:
        out = []
        in_place = self.case.split("-")[0] in IN_PLACE
        if in_place and (self.rc1 != 0 or not self.named):
            out.append(f"not restored in place with a warning naming {self.rel} (rc1 {self.rc1})")
        elif in_place:
            pass
        elif self.rc1 == 0:
            out.append("damage not noticed (rc1 0)")
        elif not self.named:
            out.append(f"no `d3s: ` line names {self.rel} or its store")
        if self.rc1 != 0 and self.remedy is None:
            out.append("no `d3s ...` remedy in the message")
        if self.remedy is not None and self.remedy_rc != 0:
            out.append(f"remedy `{self.remedy}` rc {self.remedy_rc}")
        if self.rc2 != 0:
            out.append(f"rc2 {self.rc2}: {self.message2[:300]}")
        if self.differ:
            shown = ", ".join(self.differ[:5])
            more = f" and {len(self.differ) - 5} more" if len(self.differ) > 5 else ""
            out.append(f"not byte-identical: {shown}{more}")
        out += [f"leaked {e}" for e in self.leaked]
        return out


class Collect(logging.Handler):
    """The pipeline's own log records (logger "d3s": a restore in place is a warning there),
    whatever Prefect's handlers do with them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def call(argv: list[str], capsys, outcome: Outcome, step: str) -> tuple[int | str, str]:
    """main(argv) in process: its return code (or what it raised), and its stderr followed by
    the warnings the pipeline logged."""
    collect = Collect()
    logging.getLogger("d3s").addHandler(collect)
    try:
        rc: int | str = main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else f"exit {e.code!r}"
    except Exception as e:  # a raw exception out of the CLI: recorded, the case goes on
        first = (str(e).splitlines() or [""])[0][:300]
        outcome.leaked.append(f"{step}: {type(e).__name__}: {first}")
        rc = f"raised {type(e).__name__}"
    finally:
        logging.getLogger("d3s").removeHandler(collect)
    return rc, "\n".join([capsys.readouterr().err, *collect.lines])


def d3s_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("d3s: ")]


def warning_lines(err: str) -> list[str]:
    """The lines that are not the CLI's error line (a restore in place is a warning)."""
    return [line for line in err.splitlines() if not line.startswith("d3s: ")]


def names_damage(lines: list[str], root: Path, rel: str, recorded: set[str]) -> bool:
    """Whether one line names the file, or a store holding it (a `.zarr` directory, or the
    manifest's artifact it belongs to), by its path under `root`."""
    parts = rel.split("/")
    stores = [
        "/".join(parts[:i])
        for i in range(1, len(parts))
        if parts[i - 1].endswith(".zarr") or "/".join(parts[:i]) in recorded
    ]
    wanted = [f"{root}/{rel}", *(f"{root}/{s}" for s in stores)]
    return any(any(w in line for w in wanted) for line in lines)


REMEDY = re.compile(r"`(d3s [^`]+)`")


def remedy_in(message: str) -> str | None:
    """The first backquoted `d3s ...` command of the message."""
    m = REMEDY.search(message)
    return m.group(1) if m else None


def remedy_argv(command: str, config: str, root: Path) -> list[str]:
    """main's argv for a `d3s ...` command; `d3s run` without a root gets this run's config
    and root."""
    args = shlex.split(command)[1:]
    if args and args[0] == "run" and "--root" not in args:
        args = ["run", config, "--root", str(root), *args[1:]]
    return args


@pytest.fixture(scope="module")
def finished(prefect_server, tmp_path_factory):
    """A finished run of CONFIG through `d3s run`: (root, config path, files, manifest keys)."""
    base = tmp_path_factory.mktemp("battery")
    config = base / "config.json"
    config.write_text(json.dumps(CONFIG))
    root = base / "run"
    torch.manual_seed(0)
    assert main(["run", str(config), "--root", str(root)]) == 0
    recorded = set(json.loads((root / "manifest.json").read_text())["artifacts"])
    return root, str(config), files(root), recorded


@pytest.fixture(scope="module")
def finished_folder(prefect_server, tmp_path_factory):
    """CONFIG on a small RGB ImageFolder tree (a dataset index and its listing), finished."""
    base = tmp_path_factory.mktemp("battery-folder")
    tree = rgb_tree(base / "tree", classes=10, per_class=8, val=2)
    cfg = {**CONFIG, "name": "battery-folder"}
    cfg["dataset"] = {
        "kind": "imagefolder",
        "path": str(tree / "train"),
        "val_path": str(tree / "val"),
    }
    cfg["validation"] = {"students": 1, "epochs": 1}
    config = base / "config.json"
    config.write_text(json.dumps(cfg))
    root = base / "run"
    assert main(["run", str(config), "--root", str(root)]) == 0
    recorded = set(json.loads((root / "manifest.json").read_text())["artifacts"])
    return root, str(config), files(root), recorded


def run_case(finished, tmp_path, capsys, kind: str, damage: str, remedy_kind: str) -> Outcome:
    root, config, before, recorded = finished
    rel = {**KINDS, **INDEX_KINDS}[kind](root)
    outcome = Outcome(f"{kind}-{damage}", remedy_kind, rel)
    start = time.monotonic()
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    capsys.readouterr()
    DAMAGES[damage](copy / rel)

    outcome.rc1, err = call(["run", config, "--root", str(copy)], capsys, outcome, "run")
    lines = d3s_lines(err) if kind not in IN_PLACE else warning_lines(err)
    outcome.message = " | ".join(lines)[:1000]
    outcome.named = names_damage(lines, copy, rel, recorded)
    if outcome.rc1 != 0:
        found = remedy_in("\n".join(lines))
        outcome.remedy = found if remedy_kind == "suggested" else "d3s run --repair"
    if outcome.remedy is not None:
        argv = remedy_argv(outcome.remedy, config, copy)
        outcome.remedy_rc, err = call(argv, capsys, outcome, "remedy")
        outcome.remedy_message = " | ".join(d3s_lines(err))[:1000]
    outcome.rc2, err = call(["run", config, "--root", str(copy)], capsys, outcome, "rerun")
    outcome.message2 = " | ".join(d3s_lines(err))[:1000]
    outcome.differ = differences(files(copy), before)
    outcome.seconds = round(time.monotonic() - start, 2)

    log = os.environ.get("D3S_BATTERY_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps(asdict(outcome)) + "\n")
    return outcome


def check(outcome: Outcome) -> None:
    problems = outcome.problems()
    if problems:
        pytest.fail(f"{outcome.case} ({outcome.rel}): " + "; ".join(problems), pytrace=False)


# -- the tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "damage"), ISSUE_CASES, ids=[f"{k}-{d}" for k, d in ISSUE_CASES])
def test_issue_case(finished, tmp_path, capsys, kind, damage):
    """The issue's three cases, in the default tier."""
    if kind == "manifest":  # the damage leaves a manifest that is not JSON
        with pytest.raises(ValueError):
            json.loads(truncated((finished[0] / "manifest.json").read_bytes()))
    check(run_case(finished, tmp_path, capsys, kind, damage, "suggested"))


@pytest.mark.slow
def test_undamaged_copy_runs_to_the_same_bytes(finished, tmp_path):
    root, config, before, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    assert main(["run", config, "--root", str(copy)]) == 0
    assert differences(files(copy), before) == []


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "damage"), CASES, ids=IDS)
def test_battery(finished, tmp_path, capsys, kind, damage):
    """The remedy the message gives."""
    check(run_case(finished, tmp_path, capsys, kind, damage, "suggested"))


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "damage"), CASES, ids=IDS)
def test_battery_run_repair(finished, tmp_path, capsys, kind, damage):
    """`d3s run --repair`, whatever the message suggests."""
    check(run_case(finished, tmp_path, capsys, kind, damage, "run_repair"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "damage", "remedy"), INDEX_CASES, ids=[f"{k}-{d}-{r}" for k, d, r in INDEX_CASES]
)
def test_battery_dataset_index(finished_folder, tmp_path, capsys, kind, damage, remedy):
    """The dataset index of an ImageFolder run: indexed again in place, to the same bytes."""
    check(run_case(finished_folder, tmp_path, capsys, kind, damage, remedy))
