"""A study: one base run config, variants of it (ablation switches and baselines), the Fig. 4
sweeps, and the plan that runs them with teachers and statistics computed once.

Study config (JSON):

    {"name": "mnist-ablation", "base": {<run config>}, "students": 3, "reference": "d3s",
     "variants": {"d3s": {}, "diag": {"synthesis": {"params": {"loss": "kl_diag"}}},
                  "random-real": {"kind": "random-real"}, "herding": {"kind": "herding"},
                  "full-data": {"kind": "full-data"}},
     "label_epochs": [5, 10, 30], "student_epochs": [25, 50, 100]}

Each variant is the base deep-merged with its overrides and validated as a run config. A
variant may not override what the variants share (dataset, teachers, statistics, seed, preset).
Its `kind` (default "d3s", distilled images) may name a baseline instead, which has no synthesis
to override: "random-real" (a seeded random real subset of IPC images per class), "herding" or
"k-center" (a coreset of IPC real images per class chosen in teacher
`validation.coreset_teacher`'s feature space), each labelled and validated like the distilled
sets under every protocol of `validation.protocols` ("soft": the ensemble's labels, "hard": class
labels); "full-data" (`validation.full_data_students` students on the whole training set,
hard protocol only: the denominator of DD-Ranking's hard-label recovery). A cell runs only its
own kind's image set: the run-level baseline switches (`validation.random_real_baseline`,
`coresets`, `full_data`) are set by the plan, never by the variant. The study report scores
every variant under every protocol against the random-real and full-data variants
(docs/study.md, "Scores"). The Fig. 4 sweeps train the reference variant's students on
`label_epochs` labelled epochs (student epochs fixed) and for `student_epochs` epochs (labelled
epochs fixed). Layout under the study root: `shared/` (a run root of the base config holding
teachers and statistics), `variants/<cell>/` (a run root per distinct config and kind),
`report/`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .config import RunConfig, canonical_json, parse_config
from .fs import RunFS
from .run import baseline_prefix

SHARED_KEYS = ("dataset", "teachers", "stats", "seed", "preset")
SHARED = "shared"
Kind = Literal["d3s", "random-real", "herding", "k-center", "full-data"]
KINDS: tuple[Kind, ...] = ("d3s", "random-real", "herding", "k-center", "full-data")
BASELINES = KINDS[1:]  # kinds without synthesis (storage/run.py BASELINE_KINDS)
# What a cell's config says about the run-level baselines: none, then its own kind's.
NO_BASELINES = {"random_real_baseline": False, "coresets": [], "full_data": False}
Sweep = Literal["label_epochs", "student_epochs"]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class StudySpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    base: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    students: int | None = Field(None, ge=1)
    reference: str = "d3s"
    label_epochs: list[int] = []
    student_epochs: list[int] = []


@dataclass(frozen=True)
class Cell:
    """One run of the study: its name (its root is variants/<name>), kind and config, and the
    earlier cells whose distilled images and label epochs it reuses (storage/share.py)."""

    name: str
    kind: Kind
    config: RunConfig
    images_from: str | None = None
    labels_from: str | None = None

    @property
    def root(self) -> str:
        return f"variants/{self.name}"

    @property
    def prefix(self) -> str:
        """Where its image set and validation live in its run root: the distilled set's ("")
        or its baseline's (storage/run.py baseline_prefix)."""
        return "" if self.kind == "d3s" else baseline_prefix(self.kind)

    @property
    def protocols(self) -> list[str]:
        """The protocols its students are validated under (the full-data reference: hard)."""
        return ["hard"] if self.kind == "full-data" else list(self.config.validation.protocols)

    @property
    def has_images(self) -> bool:
        """Whether it has an image set (the full-data reference trains on the training set)."""
        return self.kind != "full-data"


@dataclass
class StudyPlan:
    shared: RunConfig
    cells: list[Cell]  # distinct runs, in the order they run (the reference first)
    variants: dict[str, str]  # variant name -> the cell holding its results
    sweeps: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # (value, cell)
    reference: str = "d3s"

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _digest(cfg: RunConfig, leave_out: set[str], **replace: dict[str, Any]) -> str:
    data = cfg.model_dump(mode="json", exclude={"name", "storage", "dask", "distributed"})
    for section in leave_out:
        del data[section]
    for section, values in replace.items():
        data[section] = {**data[section], **values}
    return hashlib.sha256(canonical_json(data)).hexdigest()


def results_key(cfg: RunConfig) -> str:
    """What a run's results depend on: its config but for its name, with the students'
    defaults resolved (epochs None and the preset's 100 are the same run)."""
    return _digest(
        cfg, set(), validation={"epochs": student_epochs(cfg), "arch": cfg.student_arch()}
    )


def synthesis_key(cfg: RunConfig) -> str:
    """Two configs with the same key synthesise the same images (labels and validation do not
    enter synthesis)."""
    return _digest(cfg, {"labels", "validation"})


def labelling_key(cfg: RunConfig) -> str:
    """Two configs with the same key write the same label epoch e (epoch e depends on the
    images, teachers, seed, e and the labelling settings, not on how many epochs there are)."""
    return _digest(cfg, {"validation"}, labels={"epochs": None})


def _variant_config(spec: StudySpec, name: str, over: dict[str, Any]) -> tuple[Kind, RunConfig]:
    where = f"study {spec.name!r}, variant {name!r}"
    if not _NAME.fullmatch(name):
        raise ValueError(f"{where}: a variant name may hold letters, digits, '_', '.', '-' only")
    over = dict(over)
    kind = over.pop("kind", "d3s")
    if kind not in KINDS:
        raise ValueError(
            f"{where}: unknown kind {kind!r}; expected one of {', '.join(map(repr, KINDS))}"
        )
    shared = [k for k in SHARED_KEYS if k in over]
    if shared:
        raise ValueError(
            f"{where}: overrides {shared}: every variant of a study shares the teachers and "
            f"statistics, so {list(SHARED_KEYS)} can only be set in 'base' (a new study)"
        )
    if kind != "d3s" and "synthesis" in over:
        raise ValueError(f"{where}: a {kind} baseline has no synthesis to override")
    merged = deep_merge(spec.base, over)
    merged["name"] = f"{spec.name}-{name}"
    merged = deep_merge(merged, {"validation": _baselines_of(kind)})
    return kind, parse_config(merged, where)


def _baselines_of(kind: str) -> dict[str, Any]:
    """The validation settings that make a cell of `kind` run its own baseline and no other."""
    if kind in ("herding", "k-center"):
        return {**NO_BASELINES, "coresets": [kind]}
    if kind == "full-data":
        return {**NO_BASELINES, "full_data": True}
    return dict(NO_BASELINES)


def _donors(earlier: list[Cell], kind: Kind, cfg: RunConfig) -> tuple[str | None, str | None]:
    """The first earlier cell with the same images, and the earlier cell with the same
    labelling and the most label epochs."""
    if kind != "d3s":
        return None, None
    ours = [c for c in earlier if c.kind == "d3s"]
    images = [c for c in ours if synthesis_key(c.config) == synthesis_key(cfg)]
    labels = [c for c in images if labelling_key(c.config) == labelling_key(cfg)]
    best = max(labels, key=lambda c: c.config.labels.epochs, default=None)
    return (images[0].name if images else None), (best.name if best else None)


def plan_study(spec: StudySpec) -> StudyPlan:
    """Validate every variant and sweep point and lay out the distinct runs. Variants or
    points with the same config (but for the name) share one run."""
    if not _NAME.fullmatch(spec.name):
        raise ValueError(f"study name {spec.name!r}: letters, digits, '_', '.', '-' only")
    base = dict(spec.base)
    if spec.students is not None:
        base = deep_merge(base, {"validation": {"students": spec.students}})
    spec = spec.model_copy(update={"base": base})
    shared = parse_config(
        {
            **deep_merge(base, {"validation": dict(NO_BASELINES)}),
            "name": f"{spec.name}-{SHARED}",
        },
        f"study {spec.name!r}, base",
    )
    if spec.reference not in spec.variants:
        raise ValueError(
            f"study {spec.name!r}: reference variant {spec.reference!r} is not among the "
            f"variants {sorted(spec.variants)}"
        )
    plan = StudyPlan(shared, [], {}, {}, spec.reference)
    by_key: dict[tuple[str, str], str] = {}

    def add(name: str, kind: Kind, cfg: RunConfig) -> str:
        key = (kind, results_key(cfg))
        if key not in by_key:
            by_key[key] = name
            plan.cells.append(Cell(name, kind, cfg, *_donors(plan.cells, kind, cfg)))
        return by_key[key]

    order = [spec.reference] + [v for v in spec.variants if v != spec.reference]
    configs = {v: _variant_config(spec, v, spec.variants[v]) for v in order}
    ref_kind, ref = configs[spec.reference]
    if ref_kind != "d3s":
        raise ValueError(f"study {spec.name!r}: the reference variant must be of kind 'd3s'")
    for v in order:
        plan.variants[v] = add(v, *configs[v])
    sweeps: list[tuple[Sweep, str, str, list[int]]] = [
        ("label_epochs", "labels", "epochs", spec.label_epochs),
        ("student_epochs", "validation", "epochs", spec.student_epochs),
    ]
    for sweep, section, key, values in sweeps:
        if any(v < 1 for v in values):
            raise ValueError(f"study {spec.name!r}: {sweep} must be positive, got {values}")
        points = []
        for value in sorted(set(values)):
            name = f"fig4-{sweep.replace('_', '-')}-{value}"
            data = deep_merge(ref.model_dump(mode="json"), {section: {key: value}, "name": ""})
            cfg = parse_config({**data, "name": f"{spec.name}-{name}"}, f"{spec.name}: {name}")
            points.append((value, add(name, "d3s", cfg)))
        if points:
            plan.sweeps[sweep] = points
    return plan


def student_epochs(cfg: RunConfig) -> int:
    """Epochs each validation student trains for (the config's, else the preset's)."""
    return cfg.validation.epochs or cfg.preset_obj().student.epochs


def match_path(cell: str) -> str:
    """Where a cell's distribution-match numbers (tasks/stages/match.py) live, under the
    study root: one JSON file per cell with images of its own."""
    return f"report/match/{cell}.json"


def read_match(fs: RunFS, cell: str) -> dict[str, Any] | None:
    """A cell's match numbers, or None if not measured yet."""
    rel = match_path(cell)
    if not fs.exists(rel):
        return None
    try:
        return json.loads(fs.read_bytes(rel))
    except json.JSONDecodeError as e:
        raise ValueError(f"{fs.url(rel)}: not valid JSON ({e}); delete it to measure again") from e


def write_match(fs: RunFS, cell: str, data: dict[str, Any]) -> None:
    fs.write_bytes(match_path(cell), json.dumps(data, indent=1).encode())
