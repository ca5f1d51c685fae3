"""The resolved run configuration: typed, validated, saved beside the artifacts with its hash.

Unknown keys are errors (a typo must not silently fall back to a default), and so is every value
out of its range or of the wrong type (no string for a number, no 1.0 for an integer); the error
names the key, e.g. `config: teachers.train.lr: -0.1 must be > 0`. Older saved configs load
with defaults for keys they lack.

A root's configuration is fixed by the first artifact written under it: until then (a start
that failed at once) config.json is replaced by the next configuration given; afterwards a
different configuration is refused, naming the keys that differ.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, fields, is_dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from d3s_core.presets import (
    PRESETS,
    DataShape,
    LabelConfig,
    Preset,
    StudentConfig,
    fit_to_data,
    get_preset,
)
from d3s_core.synthesis import SynthesisConfig
from d3s_core.teachers import TeacherTrainConfig, check_range

from .fs import RunFS
from .lock import LOCK_FILE
from .manifest import MANIFEST
from .urls import check_no_credentials

CONFIG_FILE = "config.json"
SCHEMA_VERSION = 1
# Sections that do not change the results: not hashed, never reported as a difference.
UNHASHED = frozenset({"storage", "dask", "distributed"})


class Strict(BaseModel):
    # strict: no coercion ("0.1" is not a number, 2.0 not an integer, true not 1);
    # allow_inf_nan=False: no NaN or infinity where a number is expected.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class DatasetSpec(Strict):
    """kind: "mnist5k" (bundled real digits), "imagefolder" (train/<class>/*.ext tree; `path`
    and optionally `val_path`), "webdataset" (tar shards of KEY.jpg + KEY.cls samples; `path`
    and `val_path`: a folder, a brace pattern `.../train-{000000..000146}.tar` or a tar file,
    local or an fsspec URL), or "synthetic" (random tensors for tests)."""

    kind: Literal["mnist5k", "imagefolder", "webdataset", "synthetic"] = "mnist5k"
    path: str | None = None
    val_path: str | None = None
    synthetic_size: int = Field(256, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    # The data's shape, declared; what is left unset is found from the data (docs/datasets.md):
    # num_classes from the class folders or the shards' classes, channels and image_size from
    # the sampled images' headers, mean/std measured in one pass over the sampled images.
    num_classes: int | None = Field(None, ge=1)
    channels: Literal[1, 3] | None = None
    image_size: int | None = Field(None, ge=8)
    # Resize rule: the short side to image_size * crop_ratio, then a centre crop. Unset: 1.0
    # when every sampled image has the run's image_size as its short side, else 8/7.
    crop_ratio: float | None = Field(None, ge=1, le=4)
    mean: list[float] | None = None
    std: list[float] | None = None
    # "measure": mean/std of the (sampled) training images; "preset": the preset's constants
    # (ImageNet's for the ImageNet presets). Unset: the preset's for the preset's own data
    # (mnist5k for demo-mnist, the synthetic test data), measured otherwise.
    normalisation: Literal["measure", "preset"] | None = None
    # Images inspected for channels/size and measured for mean/std: all of them up to this
    # many, else a seeded uniform sample of this many.
    profile_samples: int = Field(100_000, ge=1)


class ModelSpec(Strict):
    """The teachers' network (and the students' unless validation.arch is set). Unset fields
    take the preset's. arch: "resnet18|34|50|101" (torchvision, with the low-resolution stem
    when low_res), "small_resnet" (ResNet-18 layout at base width `width`), any other
    torchvision classification model by name, or "timm:<name>". Its input channels, class
    count and image size are the data's."""

    arch: str | None = None
    width: int | None = Field(None, ge=1)
    low_res: bool | None = None


class TeachersSpec(Strict):
    """import_from: existing weights used as the teachers as they are (one file per teacher);
    init_from: weights training starts from (the classifier is re-initialised if its class
    count differs), as the paper's ImageNet-21K teachers start from ImageNet-1K ones.
    count: the preset's unless set."""

    count: int = Field(2, ge=1)
    import_from: list[str] = []
    init_from: list[str] = []
    train: dict[str, Any] = {}
    checkpoint_every_epochs: int = Field(1, ge=1)


class StatsSpec(Strict):
    """autocast: "bf16" runs the teachers' forward under bfloat16 autocast (d3s_core/precision.py);
    the statistics are still taken in float32/float64 and accumulated in float64."""

    precision: Literal["mixed", "float64"] = "mixed"
    autocast: Literal["off", "bf16"] = "off"
    batch_size: int = Field(256, ge=1)
    workers: int = Field(2, ge=0)
    layers: str | list[str] | None = None
    # Batches per statistics shard: the unit of checkpointing and of Dask parallelism.
    checkpoint_batches: int = Field(50, ge=1)


class SynthesisSpec(Strict):
    ipc: int = Field(10, ge=1)
    batch_size: int = Field(200, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    # A checkpoint is written at the end of an interval of `checkpoint_every` iterations once
    # this many seconds have passed since the batch started or was last checkpointed (0: at the
    # end of every interval). Bounds the work a kill loses to about this much plus one
    # interval, while a 224 px batch's 361 MB state is not written 20 times per batch.
    checkpoint_seconds: float = Field(300.0, ge=0)
    init: Literal["noise", "real"] = "noise"
    params: dict[str, Any] = {}


class LabelsSpec(Strict):
    """teachers: "ensemble" labels with the mean logits of all M teachers (ENL, Sec. 4.3);
    "single" with teacher 0 alone (the ablation of Fig. 3a). epochs and batch_size: the
    preset's unless set; params: other fields of its label recipe (min_crop_scale, flip)."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    params: dict[str, Any] = {}
    format: Literal["fp32", "fp16", "topk"] = "fp32"
    topk: int = Field(10, ge=1)
    teachers: Literal["ensemble", "single"] = "ensemble"


Protocol = Literal["soft", "hard"]
CoresetMethod = Literal["herding", "k-center"]


class ValidationSpec(Strict):
    """How image sets are validated, and against which baselines (docs/study.md, "Scores").

    protocols: "soft" trains students by knowledge distillation on the stored ensemble labels
    (the paper's protocol); "hard" trains the same students on the same images with their
    class labels and cross-entropy, under the same random-resized-crop and flip (drawn per
    epoch, seeded). Every image set of the run (the distilled set and each baseline) is
    validated under each listed protocol.
    random_real_baseline: also validate a random real subset of IPC images per class,
    labelled the same way (the baseline every distillation method must beat).
    coresets: also validate coreset selections of IPC real images per class, chosen in
    teacher `coreset_teacher`'s penultimate feature space (herding; k-center greedy).
    full_data: also train `full_data_students` students on the whole training set under the
    hard protocol, for `full_data_epochs` epochs (default: the teachers' recipe's), the
    denominator of hard-label recovery. Cheap at demo size; hours at ImageNet size."""

    students: int = Field(2, ge=1)
    protocols: list[Protocol] = Field(["soft"], min_length=1)
    random_real_baseline: bool = False
    coresets: list[CoresetMethod] = []
    coreset_teacher: int = Field(0, ge=0)
    full_data: bool = False
    full_data_students: int = Field(1, ge=1)
    full_data_epochs: int | None = Field(None, ge=1)
    arch: str | None = None
    epochs: int | None = Field(None, ge=1)
    checkpoint_every_epochs: int = Field(10, ge=1)
    # Other fields of the preset's student recipe (optimizer, lr, momentum, weight_decay,
    # batch_size, schedule, temperature).
    params: dict[str, Any] = {}


class StorageSpec(Strict):
    """secret_block: name of a Prefect Secret block whose value is a JSON object of fsspec
    storage options for the run root (for S3: key, secret, token, endpoint_url). The block's
    name is saved; its value never is. Not part of the config hash: where the credentials come
    from does not change the results."""

    secret_block: str | None = None


class DaskSpec(Strict):
    """Run the embarrassingly parallel passes (statistics shards, label epochs) on Dask.
    address: an existing scheduler (e.g. "tcp://10.0.0.5:8786"); None starts a LocalCluster of
    `workers` processes with `threads_per_worker` threads each, listening on 127.0.0.1 only.
    Not part of the config hash: where the work runs does not change the results."""

    address: str | None = None
    workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)


class DistributedSpec(Strict):
    """Synthesis data-parallel over `ranks` processes (torchrun; one per GPU with NCCL, gloo on
    CPU), launched by the flow's synthesis task (tasks/distributed_synthesis.py). Not part of
    the config hash: a run can be resumed with another number of ranks."""

    ranks: int = Field(1, ge=1)
    backend: Literal["nccl", "gloo"] | None = None
    timeout_min: float = Field(30.0, gt=0)


class RunConfig(Strict):
    """Everything that determines a run's results. `preset` supplies defaults (Tables 8-10);
    the per-stage sections override them."""

    schema_version: int = Field(SCHEMA_VERSION, ge=1)
    name: str = "d3s"
    preset: str = "demo-mnist"
    seed: int = Field(0, ge=0)
    device: str = "cpu"
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    teachers: TeachersSpec = Field(default_factory=TeachersSpec)
    stats: StatsSpec = Field(default_factory=StatsSpec)
    synthesis: SynthesisSpec = Field(default_factory=SynthesisSpec)
    labels: LabelsSpec = Field(default_factory=LabelsSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    dask: DaskSpec | None = None
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        # Every way in (parse_config, a Prefect parameter, model_validate) fills the same keys.
        return fill_recipe(data) if isinstance(data, dict) else data

    # -- resolved pieces -----------------------------------------------------------------
    def preset_obj(self) -> Preset:
        return get_preset(self.preset)

    def recipe_sources(self) -> dict[str, tuple[Any, str]]:
        """Each recipe key (`RECIPE_KEYS` and the fields of the four recipe sections) -> (value,
        "preset" where it is the preset's value, "config" where the config changed it)."""
        p = self.preset_obj()
        out: dict[str, tuple[Any, str]] = {}
        for key, of in RECIPE_KEYS.items():
            head, _, tail = key.partition(".")
            value = getattr(getattr(self, head), tail)
            out[key] = (value, "preset" if value == of(p) else "config")
        for section, base, mine in (
            ("teachers.train", p.teacher, self.teacher_train()),
            ("synthesis.params", p.synthesis, self.synthesis_cfg()),
            ("labels.params", p.labels, self.label_cfg()),
            ("validation.params", p.student, self.student_cfg()),
        ):
            for f in fields(base):
                if f.name in ("mean", "std") or f"{section}.{f.name}" in _OWN_FULL:
                    continue
                a, b = getattr(base, f.name), getattr(mine, f.name)
                out[f"{section}.{f.name}"] = (b, "preset" if a == b else "config")
        sc = self.student_cfg()
        for name in ("epochs", "arch"):
            a, b = getattr(p.student, name), getattr(sc, name)
            out[f"validation.{name}"] = (b, "preset" if a == b else "config")
        return out

    def fitted(self, shape: DataShape) -> Preset:
        """The recipe fitted to data of `shape`: the preset with this config's model and recipe
        fields (d3s_core.presets.fit_to_data)."""
        assert self.model.arch is not None and self.model.width is not None  # filled
        return fit_to_data(
            self.preset_obj(),
            shape,
            arch=self.model.arch,
            width=self.model.width,
            low_res=bool(self.model.low_res),
            teachers=self.teachers.count,
            ipc=self.synthesis.ipc,
            synthesis_batch=self.synthesis.batch_size,
            synthesis=self.synthesis_cfg(),
            labels=self.label_cfg(),
            student=self.student_cfg(),
        )

    def label_cfg(self) -> LabelConfig:
        """The label recipe: the preset's, with labels.epochs, labels.batch_size and
        labels.params."""
        merged = {**self.labels.params, "epochs": self.labels.epochs}
        merged["batch_size"] = self.labels.batch_size
        return _override(self.preset_obj().labels, merged, "labels.params")

    def student_cfg(self) -> StudentConfig:
        """The student recipe: the preset's, with validation.params, .students, .epochs and
        .arch."""
        merged: dict[str, Any] = {**self.validation.params, "students": self.validation.students}
        if self.validation.epochs is not None:
            merged["epochs"] = self.validation.epochs
        if self.validation.arch is not None:
            merged["arch"] = self.validation.arch
        return _override(self.preset_obj().student, merged, "validation.params")

    def teacher_train(self) -> TeacherTrainConfig:
        return _override(self.preset_obj().teacher, self.teachers.train, "teachers.train")

    def synthesis_cfg(self) -> SynthesisConfig:
        return _override(self.preset_obj().synthesis, self.synthesis.params, "synthesis.params")

    def student_arch(self) -> str:
        """Validation students' architecture: the config's, else the preset's."""
        return self.validation.arch or self.preset_obj().student.arch

    def config_hash(self) -> str:
        return hashlib.sha256(canonical_json(self.hashed())).hexdigest()

    def hashed(self) -> dict[str, Any]:
        """The sections that determine the results, as JSON values (what the hash covers)."""
        data = self.model_dump(mode="json", exclude=set(UNHASHED))
        # How often a checkpoint is written changes no result: a run may change it on resume.
        data["synthesis"].pop("checkpoint_seconds", None)
        # Nor how many images are inspected for shape and normalisation once they are found.
        data["dataset"].pop("profile_samples", None)
        return data


# Recipe keys of the config that default to the preset's values (filled in by `parse_config`,
# so the saved config.json holds the values the run used): dotted key -> preset attribute.
RECIPE_KEYS: dict[str, Any] = {
    "model.arch": lambda p: p.arch,
    "model.width": lambda p: p.width,
    "model.low_res": lambda p: p.low_res,
    "teachers.count": lambda p: p.teachers,
    "synthesis.ipc": lambda p: p.ipc,
    "synthesis.batch_size": lambda p: p.synthesis_batch,
    "labels.epochs": lambda p: p.labels.epochs,
    "labels.batch_size": lambda p: p.labels.batch_size,
    "validation.students": lambda p: p.student.students,
}
# Keys of a params section that have their own config key.
_OWN_KEYS = {
    "labels.params": {"epochs": "labels.epochs", "batch_size": "labels.batch_size"},
    "validation.params": {
        "students": "validation.students",
        "epochs": "validation.epochs",
        "arch": "validation.arch",
    },
}


_OWN_FULL = {f"{s}.{k}" for s, own in _OWN_KEYS.items() for k in own}


def fill_recipe(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with every unset `RECIPE_KEYS` key set to the preset's value. Sections that are
    not objects are left for validation to refuse."""
    name = data.get("preset", RunConfig.model_fields["preset"].default)
    if not isinstance(name, str) or name not in PRESETS:
        return data  # validation names the bad preset
    p = PRESETS[name]
    out = dict(data)
    for key, value in RECIPE_KEYS.items():
        section, field_name = key.split(".")
        sec = out.get(section, {})
        if isinstance(sec, dict) and sec.get(field_name) is None:
            out[section] = {**sec, field_name: value(p)}
    return out


def _override(base: Any, overrides: dict[str, Any], where: str) -> Any:
    assert is_dataclass(base) and not isinstance(base, type)
    known = {f.name for f in fields(base)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; known: {sorted(known)}")
    values = asdict(base)
    hints = get_type_hints(type(base))
    for k, v in overrides.items():
        allowed = get_args(hints[k]) if get_origin(hints[k]) is Literal else None
        if allowed and (isinstance(v, (list, dict)) or v not in allowed):
            raise ValueError(f"{where}.{k}: {v!r} is not one of {list(allowed)}")
        values[k] = tuple(v) if isinstance(values[k], tuple) and isinstance(v, list) else v
    try:
        # __post_init__ checks every value and names the field ("lr: -0.1 must be > 0")
        return type(base)(**values)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}.{e}") from None


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _check(cfg: RunConfig) -> None:
    t = cfg.teachers
    for name, files in (("import_from", t.import_from), ("init_from", t.init_from)):
        if files and len(files) != t.count:
            raise ValueError(f"teachers.{name} lists {len(files)} files for {t.count} teachers")
    if t.import_from and t.init_from:
        raise ValueError("teachers.import_from and teachers.init_from exclude each other")
    urls = [("dataset.path", cfg.dataset.path), ("dataset.val_path", cfg.dataset.val_path)]
    urls += [(f"teachers.import_from[{i}]", u) for i, u in enumerate(t.import_from)]
    urls += [(f"teachers.init_from[{i}]", u) for i, u in enumerate(t.init_from)]
    for where, url in urls:
        if url:
            check_no_credentials(url, where)
    if cfg.dataset.kind in ("imagefolder", "webdataset") and not cfg.dataset.path:
        raise ValueError(f"dataset.path is required for a {cfg.dataset.kind!r} dataset")
    p = cfg.preset_obj()
    _check_preset(p)
    for name in ("mean", "std"):
        if name in cfg.synthesis.params:
            raise ValueError(
                f"synthesis.params.{name}: the normalisation is the data's; declare "
                f"dataset.{name} instead"
            )
    for section, own in _OWN_KEYS.items():
        head, _, tail = section.partition(".")
        for k in getattr(getattr(cfg, head), tail):
            if k in own:
                raise ValueError(f"{section}.{k}: set {own[k]} instead")
    cfg.label_cfg()
    cfg.student_cfg()
    v = cfg.validation
    for name, items in (("protocols", v.protocols), ("coresets", v.coresets)):
        if len(set(items)) != len(items):
            raise ValueError(f"validation.{name}: {items} lists an entry twice")
    if v.coreset_teacher >= t.count:
        raise ValueError(
            f"validation.coreset_teacher: {v.coreset_teacher}, but the run has {t.count} "
            f"teacher(s) (0..{t.count - 1})"
        )
    d = cfg.dataset
    if (d.mean is None) != (d.std is None):
        raise ValueError("dataset.mean and dataset.std are declared together (or neither)")
    if d.mean is not None and d.std is not None:
        if d.normalisation == "preset":
            raise ValueError(
                "dataset.normalisation: 'preset' and a declared dataset.mean exclude each other"
            )
        if len(d.mean) != len(d.std):
            raise ValueError(f"dataset.mean has {len(d.mean)} values, dataset.std {len(d.std)}")
        if d.channels is not None and len(d.mean) != d.channels:
            raise ValueError(
                f"dataset.mean: {len(d.mean)} values for dataset.channels: {d.channels}"
            )
        if any(not v > 0 for v in d.std):
            raise ValueError(f"dataset.std: {d.std} must all be > 0")
    if d.kind == "mnist5k":
        for key, value, ok in (
            ("num_classes", d.num_classes, 10),
            ("channels", d.channels, 1),
            ("image_size", d.image_size, 28),
        ):
            if value is not None and value != ok:
                raise ValueError(
                    f"dataset.{key}: {value} for the mnist5k digits, which have {ok}; unset it"
                )
    k = d.num_classes
    if k is None:
        k = {"synthetic": p.num_classes, "mnist5k": 10}.get(d.kind)
    if cfg.labels.format == "topk" and k is not None and cfg.labels.topk > k:
        raise ValueError(f"labels.topk: {cfg.labels.topk} must be <= the {k} classes of the data")
    from d3s_core.models import check_arch

    check_arch(cfg.model.arch or p.arch, cfg.model.low_res, "model.arch")
    check_arch(cfg.student_arch(), cfg.model.low_res, "validation.arch")


def _check_preset(p: Preset) -> None:
    """The preset's own label and student recipes (code, not user input: a guard against a
    bad edit). Its teacher and synthesis recipes check themselves when built."""
    where = f"preset {p.name!r}"
    for name in ("num_classes", "image_size", "in_chans", "width", "teachers", "ipc"):
        check_range(f"{where}: {name}", getattr(p, name), ge=1, integer=True)
    check_range(f"{where}: synthesis_batch", p.synthesis_batch, ge=1, integer=True)
    lab, st = p.labels, p.student
    check_range(f"{where}: labels.epochs", lab.epochs, ge=1, integer=True)
    check_range(f"{where}: labels.batch_size", lab.batch_size, ge=1, integer=True)
    check_range(f"{where}: labels.min_crop_scale", lab.min_crop_scale, gt=0, le=1)
    check_range(f"{where}: student.lr", st.lr, gt=0)
    check_range(f"{where}: student.momentum", st.momentum, ge=0, lt=1)
    check_range(f"{where}: student.weight_decay", st.weight_decay, ge=0)
    check_range(f"{where}: student.batch_size", st.batch_size, ge=1, integer=True)
    check_range(f"{where}: student.epochs", st.epochs, ge=1, integer=True)
    check_range(f"{where}: student.temperature", st.temperature, gt=0)
    check_range(f"{where}: student.students", st.students, ge=1, integer=True)


def parse_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a config dict; errors name the offending field and the source. Unset recipe
    keys take the preset's values (`fill_recipe`), so a saved config holds what the run used."""
    try:
        filled = fill_recipe(data) if isinstance(data, dict) else data
        cfg = RunConfig.model_validate(filled)
        _check(cfg)
        cfg.preset_obj()
        cfg.teacher_train()
        cfg.synthesis_cfg()
    except ValidationError as e:
        problems = "; ".join(_problem(dict(err)) for err in e.errors())
        raise ValueError(f"{source}: {problems}") from None
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return cfg


_RULES = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}
_KINDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
}


def _problem(err: dict[str, Any]) -> str:
    """One pydantic error as `key: value must be ...`."""
    loc = ".".join(str(p) for p in err["loc"])
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind in _RULES and _RULES[kind][0] in ctx:
        bound, op = _RULES[kind]
        limit = ctx[bound]
        return (
            f"{loc}: {value!r} must be {op} {limit:g}"
            if isinstance(limit, float)
            else (f"{loc}: {value!r} must be {op} {limit}")
        )
    if kind in _KINDS:
        return f"{loc}: {value!r} must be {_KINDS[kind]}"
    if kind == "extra_forbidden":
        return f"{loc}: unknown key"
    return f"{loc}: {value!r}: {err['msg']}" if "input" in err else f"{loc}: {err['msg']}"


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": {}} -> {"a.b": 1}; lists and scalars are leaves."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


_UNSET = object()


def config_differences(saved: RunConfig, given: RunConfig) -> list[tuple[str, Any, Any]]:
    """(key, saved value, given value) for every result-determining key that differs, in
    dotted form (`synthesis.params.iterations`); a key set on one side only (an override of
    synthesis.params or teachers.train) has `_UNSET` on the other. The unhashed sections
    (storage, dask, distributed) are never reported."""
    a, b = _flatten(saved.hashed()), _flatten(given.hashed())
    keys = [k for k in a if k not in b or a[k] != b[k]] + [k for k in b if k not in a]
    return [(k, a.get(k, _UNSET), b.get(k, _UNSET)) for k in keys]


def describe_differences(diffs: list[tuple[str, Any, Any]]) -> str:
    """`synthesis.params.iterations: 200 (saved) vs 400 (given); labels.epochs: 30 vs 50`."""

    def show(v: Any) -> str:
        return "(default)" if v is _UNSET else json.dumps(v)

    parts = [
        f"{k}: {show(a)} (saved) vs {show(b)} (given)" if i == 0 else f"{k}: {show(a)} vs {show(b)}"
        for i, (k, a, b) in enumerate(diffs)
    ]
    return "; ".join(parts)


def written_artifacts(fs: RunFS) -> list[str]:
    """Files under the root that a stage wrote: everything but config.json, the writer lock's
    files at the root (.lock, .lock.json, ...), an atomic writer's temporaries (.tmp-*) and a
    manifest that records nothing. Empty when a run failed before writing anything."""
    out = []
    for rel in fs.walk_files(""):
        name = rel.rsplit("/", 1)[-1]
        if rel == CONFIG_FILE or (rel == name and name.startswith(LOCK_FILE)):
            continue
        if name.startswith(".tmp-"):
            continue
        if rel == MANIFEST:
            try:
                if not json.loads(fs.read_bytes(MANIFEST)).get("artifacts"):
                    continue
            except (ValueError, AttributeError):
                pass  # an unreadable manifest counts as written
        out.append(rel)
    return out


def save_config(fs: RunFS, cfg: RunConfig) -> None:
    """Write config.json (with its hash). The first artifact written under the root fixes it:
    before that (a start that failed at once) a different configuration replaces it, with a new
    run id; afterwards it is refused, naming the differing keys, so a resumed run can never mix
    two configurations."""
    payload = {
        "config": cfg.model_dump(mode="json"),
        "config_hash": cfg.config_hash(),
        "run_id": uuid.uuid4().hex,  # tells this run from a deleted and recreated one
    }
    if fs.exists(CONFIG_FILE):
        try:
            existing: RunConfig | None = load_config(fs)
            unreadable = ""
        except (ValueError, KeyError, TypeError) as e:
            existing, unreadable = None, str(e)
        if existing is not None and existing.config_hash() == cfg.config_hash():
            return
        written = written_artifacts(fs)
        if written:
            shown = ", ".join(written[:3]) + (
                f" and {len(written) - 3} more" if len(written) > 3 else ""
            )
            if existing is None:
                raise ValueError(
                    f"{fs.url(CONFIG_FILE)}: the saved configuration cannot be read "
                    f"({unreadable}) and the run has artifacts ({shown}); use a new root"
                )
            hashes = f"hash {existing.config_hash()[:12]} vs {cfg.config_hash()[:12]}"
            raise ValueError(
                f"{fs.url(CONFIG_FILE)}: this run was started with a different configuration: "
                f"{describe_differences(config_differences(existing, cfg)) or hashes}; "
                "use a new root or the saved configuration"
            )
        # Nothing computed under the saved configuration: the given one replaces it.
    fs.write_bytes(CONFIG_FILE, json.dumps(payload, indent=2, sort_keys=True).encode())


def run_id(fs: RunFS) -> str:
    return str(json.loads(fs.read_bytes(CONFIG_FILE))["run_id"])


def load_config(fs: RunFS) -> RunConfig:
    raw = json.loads(fs.read_bytes(CONFIG_FILE))
    return parse_config(raw["config"], fs.url(CONFIG_FILE))
