"""The stage table: every stage of a run, defined once.

Each row says what the stage is called (the `d3s <name>` subcommand, the Prefect task and the
per-stage flow `d3s-<name>`), where its runner and its `d3s status` line live, which artifacts
(manifest prefixes) it writes and from which it computes each, its cache version, the stages it
runs after and when the config enables it. Everything else derives from this table:
- flows/cli.py: a subcommand per row;
- tasks/prefect_tasks.py and flows/stages.py: a task and a flow per row; flows/distill.py runs
  the enabled rows in order, each after the rows it names;
- the cache keys: the checksums of what the stage reads, its version;
- `d3s status` (tasks/status.py): each row's status function;
- `verify`/`repair` (storage/integrity.py `dependents`): the transitive closure of the rows'
  reads and writes;
- `d3s plan` (tasks/plan.py): a row per stage, in this order.

Importable without torch, Prefect or zarr (`d3s --help` builds its parser from it): runners and
status functions are named "module:function" and imported when called.

An artifact pattern is a manifest prefix in which `{m}` stands for a teacher's index and `{s}`
for a student's directory name. An artifact depends on the artifacts its `reads` patterns match,
with the same `{m}`/`{s}` where both name one: teacher 1's statistics depend on teacher 1 only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storage.config import RunConfig


@dataclass(frozen=True)
class Artifact:
    """Artifacts a stage writes (manifest prefix `pattern`) and the prefixes each is computed
    from. A keyed pattern (`{m}`, `{s}`) is one unit: damage to any of its files redoes it all."""

    pattern: str
    reads: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stage:
    name: str
    doc: str  # one line: the subcommand's help and the flow's description
    runner: str  # "module:function", called as function(run, progress)
    status: str  # "module:function", called as function(StatusContext) -> {line name: text}
    artifacts: tuple[Artifact, ...]
    version: int  # bump when the stage's code changes what it writes (old cache is ignored)
    after: tuple[str, ...] = ()  # stages whose artifacts it needs: the flow waits for them
    enabled: Callable[[RunConfig], bool] = field(default=lambda cfg: True)
    extra: bool = False  # an optional stage (the hard protocol, a baseline), not the paper's
    cached: bool = True  # False: the flow runs it every time (it verifies and returns)
    fanout: str | None = None  # "module:function": its Dask part, run first when config.dask
    summary: bool = False  # it returns one of the distilled set's validation summaries
    # Its rows of `d3s plan` (tasks/plan/): row -> "module:function" of the working set the
    # runner allocates, stated beside the runner (tasks/stages/working_set.py). None: no model.
    plan: Mapping[str, str] = field(default_factory=dict)

    @property
    def writes(self) -> tuple[str, ...]:
        """The manifest prefixes of everything it writes."""
        heads = [literal_head(a.pattern) for a in self.artifacts]
        return tuple(h for h in dict.fromkeys(heads) if not _inside(h, heads))

    @property
    def reads(self) -> tuple[str, ...]:
        """The manifest prefixes of the other stages' artifacts it reads."""
        own = self.writes
        heads = [literal_head(r) for a in self.artifacts for r in a.reads]
        heads = [h for h in heads if not h.startswith(own)]
        return tuple(h for h in dict.fromkeys(heads) if not _inside(h, heads))

    def run(self, run: Any, progress: Any = None) -> Any:
        """Run the stage on an open Run (with a progress callback, or none)."""
        fn = resolve(self.runner)
        return fn(run) if progress is None else fn(run, progress)

    def task_name(self) -> str:
        return f"{self.name.replace('-', '_')}_task"


def resolve(ref: str) -> Any:
    """The object named by "module:attribute"."""
    module, _, attr = ref.partition(":")
    return getattr(import_module(module), attr)


def _inside(prefix: str, prefixes: list[str]) -> bool:
    """Whether `prefix` lies inside another of `prefixes`."""
    return any(prefix != p and prefix.startswith(p) for p in prefixes)


def literal_head(pattern: str) -> str:
    """The pattern up to its first placeholder: the prefix every instance starts with."""
    return pattern.split("{", 1)[0]


# -- the stages -------------------------------------------------------------------------------


def _students(prefix: str, protocol: str, reads: tuple[str, ...]) -> tuple[Artifact, ...]:
    """An image set's students under one protocol (each its own unit) and their summary."""
    vdir = f"{prefix}validation{'-hard' if protocol == 'hard' else ''}/"
    return (
        Artifact(vdir + "{s}/", reads),
        Artifact(vdir + "summary.json", (vdir + "{s}/",)),
    )


def _image_set(prefix: str, chosen_from: tuple[str, ...]) -> tuple[Artifact, ...]:
    """A baseline image set under `prefix`: its images (chosen using `chosen_from`), their
    ensemble labels and its students under both protocols."""
    images = f"{prefix}images.zarr"
    # Images chosen with a teacher: everything of the set depends on it.
    whole = (Artifact(prefix, chosen_from),) if chosen_from else ()
    return (
        *whole,
        Artifact(images, chosen_from),
        Artifact(f"{prefix}labels/", ("teachers/", images)),
        *_students(prefix, "soft", (images, f"{prefix}labels/", "teachers/")),
        *_students(prefix, "hard", (images,)),
    )


def _soft(cfg: RunConfig) -> bool:
    return "soft" in cfg.validation.protocols


def _stored_labels(cfg: RunConfig) -> bool:
    """Soft students on labels stored per epoch (not `labels.format: online`)."""
    return _soft(cfg) and cfg.labels.format != "online"


def _hard(cfg: RunConfig) -> bool:
    return "hard" in cfg.validation.protocols


# The students' and labels' working sets, shared by the distilled set and the baselines.
LABELS_WS = "tasks.stages.labels:labels_working_set"
SOFT_WS = "tasks.stages.validation:validation_working_set"
HARD_WS = "tasks.stages.validation:hard_working_set"

STAGES: tuple[Stage, ...] = (
    Stage(
        "data",
        "open the dataset once: its index (listing) and profile (classes, shape, normalisation)",
        runner="tasks.stages.profile:open_data",
        status="tasks.status:data",
        artifacts=(),  # dataset/ (index, profile) is checked by its own readers
        version=1,
        cached=False,  # cheap when done (it reads the profile and the index), and never stale
    ),
    Stage(
        "teachers",
        "train the M teachers on the full training set",
        runner="tasks.stages.teachers:train_teachers",
        status="tasks.status:teachers",
        artifacts=(Artifact("teachers/teacher_{m}."),),
        version=1,
        after=("data",),
        plan={"teachers": "tasks.stages.teachers:teachers_working_set"},
    ),
    Stage(
        "stats",
        "one pass over the training set: every teacher's per-layer mean and covariance",
        runner="tasks.stages.stats:compute_stats",
        status="tasks.status:stats",
        artifacts=(Artifact("stats.zarr/teacher_{m}", ("teachers/teacher_{m}.",)),),
        version=1,
        after=("teachers",),
        fanout="tasks.dask_stages:stats_fanout",
        plan={"stats": "tasks.stages.stats:stats_working_set"},
    ),
    Stage(
        "synthesis",
        "synthesise the distilled images batch by batch (ISU, ensemble)",
        runner="tasks.stages.synthesis:synthesize",
        status="tasks.status:synthesis",
        artifacts=(Artifact("synthesis/", ("teachers/", "stats.zarr/")),),
        version=1,
        after=("stats",),
        plan={"synthesis": "tasks.stages.synthesis:synthesis_working_set"},
    ),
    Stage(
        "labels",
        "the ensemble's soft labels of every labelled epoch, with its augmentations",
        runner="tasks.stages.labels:label_run",
        status="tasks.status:labels",
        artifacts=(Artifact("labels/", ("teachers/", "synthesis/images.zarr")),),
        version=2,  # 2: label schema v2 (uint16 boxes, labelled on the quantised box)
        after=("synthesis",),
        enabled=_stored_labels,
        fanout="tasks.dask_stages:labels_fanout",
        plan={"labels": LABELS_WS},
    ),
    Stage(
        "validation",
        "students trained on the distilled set by knowledge distillation (soft protocol)",
        runner="tasks.stages.validation:validate",
        status="tasks.status:validation",
        # Online labels (labels.format: online) are the teachers' logits at each step.
        artifacts=_students("", "soft", ("synthesis/images.zarr", "labels/", "teachers/")),
        version=1,
        after=("labels",),
        enabled=_soft,
        summary=True,
        plan={"validation": SOFT_WS},
    ),
    Stage(
        "validation-hard",
        "students trained on the distilled set's class labels (hard protocol)",
        runner="tasks.stages.validation:validate_hard",
        status="tasks.status:validation_hard",
        artifacts=_students("", "hard", ("synthesis/images.zarr",)),
        version=1,
        extra=True,
        after=("synthesis",),
        enabled=_hard,
        summary=True,
        plan={"validation_hard": HARD_WS},
    ),
    Stage(
        "baseline",
        "the random real subset of the same size, labelled and validated the same way",
        runner="tasks.stages.baseline:baseline_real",
        status="tasks.status:baseline_random_real",
        artifacts=_image_set("baselines/random-real/", ()),
        version=3,  # 2: it writes its own labels/, label schema v2; 3: validation.protocols
        extra=True,
        after=("teachers",),
        enabled=lambda cfg: cfg.validation.random_real_baseline,
        plan={
            "baseline_images": "tasks.stages.real_images:real_subset_working_set",
            "baseline_labels": LABELS_WS,
            "baseline_validation": SOFT_WS,
            "baseline_validation_hard": HARD_WS,
        },
    ),
    Stage(
        "coresets",
        "coreset baselines (herding, k-center) chosen in a teacher's feature space",
        runner="tasks.stages.baseline:baseline_coresets",
        status="tasks.status:baseline_coresets",
        artifacts=(
            Artifact("baselines/coresets/", ("teachers/",)),  # the selection's checkpoint
            *_image_set("baselines/herding/", ("teachers/",)),
            *_image_set("baselines/k-center/", ("teachers/",)),
        ),
        version=1,
        extra=True,
        after=("teachers",),
        enabled=lambda cfg: bool(cfg.validation.coresets),
        plan={
            "coresets": "tasks.stages.coreset:coresets_working_set",
            "coreset_labels": LABELS_WS,
            "coreset_validation": SOFT_WS,
            "coreset_validation_hard": HARD_WS,
        },
    ),
    Stage(
        "full-data",
        "the full-data reference: students on every training image (hard protocol)",
        runner="tasks.stages.baseline:full_data_reference",
        status="tasks.status:baseline_full_data",
        artifacts=_students("baselines/full-data/", "hard", ()),
        version=1,
        extra=True,
        after=("data",),
        enabled=lambda cfg: cfg.validation.full_data,
        plan={"full_data": "tasks.stages.validation:full_data_working_set"},
    ),
)


def stages() -> tuple[Stage, ...]:
    """The table (a function, so that tests may extend it)."""
    return STAGES


def by_name() -> dict[str, Stage]:
    return {s.name: s for s in stages()}


def stage(name: str) -> Stage:
    table = by_name()
    if name not in table:
        raise ValueError(f"unknown stage {name!r}; expected one of {list(table)}")
    return table[name]


def enabled(cfg: RunConfig) -> list[Stage]:
    """The stages a run of `cfg` runs, in the table's order."""
    return [s for s in stages() if s.enabled(cfg)]


# -- what depends on what ---------------------------------------------------------------------

_SLOT = {"m": r"(?P<m>\d+)", "s": r"(?P<s>[^/]+)"}


@cache
def _regex(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", pattern)
    body = "".join(re.escape(p) if i % 2 == 0 else _SLOT[p] for i, p in enumerate(parts))
    return re.compile("^" + body)


def _bind(pattern: str, keys: dict[str, str]) -> str:
    """`pattern` with the placeholders `keys` gives filled in, cut at the first it does not."""
    out = pattern
    for k, v in keys.items():
        out = out.replace("{" + k + "}", v)
    return literal_head(out)


def _unit(rel: str) -> tuple[Artifact, str, dict[str, str]] | None:
    """The artifact `rel` belongs to, the prefix of its unit, and its keys."""
    best: tuple[Artifact, str, dict[str, str]] | None = None
    for s in stages():
        for a in s.artifacts:
            m = _regex(a.pattern).match(rel)
            if m and (best is None or len(m.group(0)) > len(best[1])):
                best = (a, m.group(0), {k: v for k, v in m.groupdict().items() if v})
    return best


def _overlaps(prefix: str, keys: dict[str, str], read: str) -> dict[str, str] | None:
    """The keys under which the artifacts at `prefix` (with `keys`) are something `read` names,
    or None where they are not. Both are prefixes: either lies inside the other."""
    m = _regex(read).match(prefix)
    if m:  # `prefix` lies inside what `read` names: its keys are read's
        return {k: v for k, v in m.groupdict().items() if v}
    if _bind(read, keys).startswith(prefix):  # `read` names a part of `prefix`
        return {k: v for k, v in keys.items() if "{" + k + "}" in read}
    return None


def dependents(rel: str) -> list[str]:
    """Manifest prefixes of everything computed from artifact `rel` (first itself, or its unit
    where its pattern is keyed), breadth first: the transitive closure of the table's reads.
    A prefix inside another one listed is left out."""
    found = _unit(rel)
    if found is None:
        return [rel]
    art, unit, keys = found
    keyed = "{" in art.pattern
    out = [unit if keyed else rel]
    frontier = [(unit if keyed else art.pattern, keys)]
    while frontier:
        prefix, pkeys = frontier.pop(0)
        for s in stages():
            for a in s.artifacts:
                for read in a.reads:
                    got = _overlaps(prefix, pkeys, read)
                    dep = None if got is None else _bind(a.pattern, got)
                    if dep is not None and dep not in out:
                        out.append(dep)
                        frontier.append((dep, got or {}))
    return [out[0]] + [d for d in out[1:] if not _inside(d, out)]
