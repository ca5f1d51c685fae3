"""The resolved run configuration: typed, validated, saved beside the artifacts with its hash.

Every rule is a pydantic type or validator, written once, on the section it belongs to (the
d3s_core recipe dataclasses check nothing: what reaches them came through here). Unknown keys
are errors (a typo must not silently fall back to a default), and so is every value out of its
range or of the wrong type (no string for a number, no 1.0 for an integer); the error names the
key, e.g. `config: teachers.train.lr: -0.1 must be > 0`. Older saved configs load with defaults
for keys they lack.

A root's configuration is fixed by the first artifact written under it: until then (a start
that failed at once) config.json is replaced by the next configuration given; afterwards a
different configuration is refused, naming the keys that differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from dataclasses import replace
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from d3s_core.models import check_arch
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
from d3s_core.teachers import TeacherTrainConfig

from . import config_errors
from .fs import RunFS
from .lock import LOCK_FILE
from .manifest import MANIFEST, PREVIOUS, CorruptArtifact, Manifest, content_sha256
from .recipes import RECIPES, LabelParams, Strict, StudentParams, SynthesisParams, TeacherTrain
from .urls import check_no_credentials

log = logging.getLogger("d3s")

CONFIG_FILE = "config.json"
SCHEMA_VERSION = 1
# Sections that do not change the results: not hashed, never reported as a difference.
UNHASHED = frozenset({"storage", "dask", "distributed"})


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

    @model_validator(mode="after")
    def _sources(self) -> DatasetSpec:
        for key in ("path", "val_path"):
            if url := getattr(self, key):
                check_no_credentials(url, f"dataset.{key}")
        if self.kind in ("imagefolder", "webdataset") and not self.path:
            raise ValueError(f"dataset.path is required for a {self.kind!r} dataset")
        return self

    @model_validator(mode="after")
    def _normalisation(self) -> DatasetSpec:
        mean, std = self.mean, self.std
        if (mean is None) != (std is None):
            raise ValueError("dataset.mean and dataset.std are declared together (or neither)")
        if mean is None or std is None:
            return self
        if self.normalisation == "preset":
            raise ValueError(
                "dataset.normalisation: 'preset' and a declared dataset.mean exclude each other"
            )
        if len(mean) != len(std):
            raise ValueError(f"dataset.mean has {len(mean)} values, dataset.std {len(std)}")
        if self.channels is not None and len(mean) != self.channels:
            raise ValueError(
                f"dataset.mean: {len(mean)} values for dataset.channels: {self.channels}"
            )
        if any(not s > 0 for s in std):
            raise ValueError(f"dataset.std: {std} must all be > 0")
        return self

    @model_validator(mode="after")
    def _mnist_shape(self) -> DatasetSpec:
        if self.kind != "mnist5k":
            return self
        for key, ok in (("num_classes", 10), ("channels", 1), ("image_size", 28)):
            value = getattr(self, key)
            if value is not None and value != ok:
                raise ValueError(
                    f"dataset.{key}: {value} for the mnist5k digits, which have {ok}; unset it"
                )
        return self


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
    train: TeacherTrain = TeacherTrain()
    checkpoint_every_epochs: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _weights(self) -> TeachersSpec:
        for key in ("import_from", "init_from"):
            files = getattr(self, key)
            if files and len(files) != self.count:
                raise ValueError(
                    f"teachers.{key} lists {len(files)} files for {self.count} teachers"
                )
        if self.import_from and self.init_from:
            raise ValueError("teachers.import_from and teachers.init_from exclude each other")
        for key in ("import_from", "init_from"):
            for i, url in enumerate(getattr(self, key)):
                check_no_credentials(url, f"teachers.{key}[{i}]")
        return self


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
    params: SynthesisParams = SynthesisParams()


class LabelsSpec(Strict):
    """teachers: "ensemble" labels with the mean logits of all M teachers (ENL, Sec. 4.3);
    "single" with teacher 0 alone (the ablation of Fig. 3a). epochs and batch_size: the
    preset's unless set; params: other fields of its label recipe (min_crop_scale, flip).
    format: how the labels are stored (fp32, fp16, topk: Parquet per epoch, docs/labels.md),
    or "online": not stored, each student step computes the teachers' ensemble logits on the
    same recorded augmentation (the same seeds), with the M teachers on the student's device."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    params: LabelParams = LabelParams()
    format: Literal["fp32", "fp16", "topk", "online"] = "fp32"
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
    params: StudentParams = StudentParams()

    @model_validator(mode="after")
    def _no_repeats(self) -> ValidationSpec:
        for key in ("protocols", "coresets"):
            items = getattr(self, key)
            if len(set(items)) != len(items):
                raise ValueError(f"validation.{key}: {items} lists an entry twice")
        return self


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

    # The most the data's size scales the teachers' epochs (`teacher_epochs_for`).
    MAX_EPOCH_SCALE: ClassVar[int] = 10

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

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        get_preset(name)
        return name

    # -- rules across sections (each section checks its own keys) ------------------------
    @model_validator(mode="after")
    def _coreset_teacher_exists(self) -> RunConfig:
        v, count = self.validation.coreset_teacher, self.teachers.count
        if v >= count:
            raise ValueError(
                f"validation.coreset_teacher: {v}, but the run has {count} teacher(s) "
                f"(0..{count - 1})"
            )
        return self

    @model_validator(mode="after")
    def _topk_within_classes(self) -> RunConfig:
        d, k = self.dataset, self.dataset.num_classes
        if k is None:
            k = {"synthetic": self.preset_obj().num_classes, "mnist5k": 10}.get(d.kind)
        if self.labels.format == "topk" and k is not None and self.labels.topk > k:
            raise ValueError(
                f"labels.topk: {self.labels.topk} must be <= the {k} classes of the data"
            )
        return self

    @model_validator(mode="after")
    def _buildable_archs(self) -> RunConfig:
        assert self.model.arch is not None  # filled from the preset
        check_arch(self.model.arch, self.model.low_res, "model.arch")
        check_arch(self.student_arch(), self.model.low_res, "validation.arch")
        return self

    @model_validator(mode="after")
    def _float64_synthesis_alone(self) -> RunConfig:
        # float64 synthesis is exact to rounding (d3s_core/synthesis.py): no bf16 anywhere.
        s = self.synthesis_cfg()
        for key, plain in (("autocast", "off"), ("cov_matmul", "full")):
            if s.dtype == "float64" and getattr(s, key) != plain:
                raise ValueError(
                    f"synthesis.params.dtype: 'float64' excludes {key} {getattr(s, key)!r}"
                )
        return self

    # -- resolved pieces -----------------------------------------------------------------
    def preset_obj(self) -> Preset:
        return get_preset(self.preset)

    def recipe_sources(self, train_images: int | None = None) -> dict[str, tuple[Any, str]]:
        """Each recipe key (`RECIPE_KEYS` and the fields of the four recipe sections) -> (value,
        "preset" where it is the preset's value, "config" where the config changed it, "data"
        where the data's size set it: `teacher_epochs_for`)."""
        p = self.preset_obj()
        out: dict[str, tuple[Any, str]] = {}
        for key, of in RECIPE_KEYS.items():
            head, _, tail = key.partition(".")
            value = getattr(getattr(self, head), tail)
            out[key] = (value, "preset" if value == of(p) else "config")
        for (head, tail), base, mine in (
            (("teachers", "train"), p.teacher, self.teacher_train(train_images)),
            (("synthesis", "params"), p.synthesis, self.synthesis_cfg()),
            (("labels", "params"), p.labels, self.label_cfg()),
            (("validation", "params"), p.student, self.student_cfg()),
        ):
            for name in RECIPES[head, tail].model_fields:
                a, b = getattr(base, name), getattr(mine, name)
                out[f"{head}.{tail}.{name}"] = (b, "preset" if a == b else "config")
        if self.teacher_epochs_for(train_images) is not None:
            out["teachers.train.epochs"] = (self.teacher_train(train_images).epochs, "data")
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
        lab = self.labels
        return lab.params.over(
            self.preset_obj().labels, epochs=lab.epochs, batch_size=lab.batch_size
        )

    def student_cfg(self) -> StudentConfig:
        """The student recipe: the preset's, with validation.params, .students, .epochs and
        .arch."""
        v = self.validation
        return v.params.over(
            self.preset_obj().student, students=v.students, epochs=v.epochs, arch=v.arch
        )

    def teacher_train(self, train_images: int | None = None) -> TeacherTrainConfig:
        """The teachers' recipe: the preset's with teachers.train; on `train_images` training
        images, its epochs from `teacher_epochs_for` where that gives them."""
        t = self.teachers.train.over(self.preset_obj().teacher)
        epochs = self.teacher_epochs_for(train_images)
        return t if epochs is None else replace(t, epochs=epochs)

    def teacher_epochs_for(self, train_images: int | None) -> int | None:
        """The teachers' epochs that make the preset's optimizer-step count (its epochs x its
        batches over its own training images) on `train_images` images, at the run's batch
        size; None where the preset's epochs stand: the config sets teachers.train.epochs, the
        teachers are imported, the data is the preset's size or unknown, or it is the synthetic
        test data (generated at the preset's shape). The full-data students follow them too."""
        p, n = self.preset_obj(), train_images
        if (
            n is None
            or self.teachers.train.epochs is not None
            or self.teachers.import_from
            or self.dataset.kind == "synthetic"
            or not p.train_images
            or n == p.train_images
        ):
            return None
        batch = self.teachers.train.over(p.teacher).batch_size
        tuned = p.teacher.epochs * math.ceil(p.train_images / p.teacher.batch_size)
        epochs = math.ceil(tuned / math.ceil(n / batch))
        # Data far smaller than the preset's (ImageNet's schedule on a few thousand images)
        # would repeat it thousands of times: at most MAX_EPOCH_SCALE x the preset's epochs.
        epochs = max(1, min(epochs, self.MAX_EPOCH_SCALE * p.teacher.epochs))
        return None if epochs == p.teacher.epochs else epochs  # the preset's stand

    def synthesis_cfg(self) -> SynthesisConfig:
        return self.synthesis.params.over(self.preset_obj().synthesis)

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


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def parse_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a config dict; errors name the offending field and the source. Unset recipe
    keys take the preset's values (`fill_recipe`), so a saved config holds what the run used."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ValueError(f"{source}: {config_errors.describe(e)}") from None


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
        if rel in (CONFIG_FILE, PREVIOUS) or (rel == name and name.startswith(LOCK_FILE)):
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
    two configurations. A config.json that is damaged (not JSON, or not matching its own hash)
    or lost after artifacts were written is written again from the given configuration when its
    hash is the one the manifest recorded with every write, with a warning naming the file;
    another configuration is refused."""
    saved = cfg.model_dump(mode="json")
    payload = {
        "config": saved,
        "content_sha256": content_sha256(saved),
        "config_hash": cfg.config_hash(),
        "run_id": uuid.uuid4().hex,  # tells this run from a deleted and recreated one
    }
    existing: RunConfig | None = None
    problem = "missing"
    if fs.exists(CONFIG_FILE):
        try:
            existing, problem = load_config(fs), ""
        except (ValueError, KeyError, TypeError) as e:
            problem = f"cannot be read ({e})"
        if existing is not None and existing.config_hash() == cfg.config_hash():
            return
    written = written_artifacts(fs)
    if written and existing is not None:
        hashes = f"hash {existing.config_hash()[:12]} vs {cfg.config_hash()[:12]}"
        raise ValueError(
            f"{fs.url(CONFIG_FILE)}: this run was started with a different configuration: "
            f"{describe_differences(config_differences(existing, cfg)) or hashes}; "
            "use a new root or the saved configuration"
        )
    try:
        finished = bool(Manifest(fs).entries())
    except CorruptArtifact:  # a broken manifest: `d3s repair` restores it (config.json first)
        finished = False
    if written and finished:  # artifacts made under the configuration the manifest recorded
        recorded = Manifest(fs).recorded_config_hash()
        if recorded != cfg.config_hash():
            shown = ", ".join(written[:3]) + (
                f" and {len(written) - 3} more" if len(written) > 3 else ""
            )
            was = (
                f"the manifest records configuration hash {recorded[:12]}, this one is "
                f"{cfg.config_hash()[:12]}: run with the configuration the run was made with"
                if recorded
                else "the manifest records no configuration hash to check a given one against"
            )
            raise ValueError(
                f"{fs.url(CONFIG_FILE)}: {problem}, and the run has artifacts ({shown}); {was}, "
                "or use a new root"
            )
        log.warning(
            "%s: %s; written again from the given configuration (its hash %s is the one the "
            "manifest recorded)",
            fs.url(CONFIG_FILE),
            problem,
            recorded[:12],
        )
    # Nothing computed under the saved configuration: the given one replaces it.
    fs.write_bytes(CONFIG_FILE, json.dumps(payload, indent=2, sort_keys=True).encode())


def run_id(fs: RunFS) -> str:
    return str(json.loads(fs.read_bytes(CONFIG_FILE))["run_id"])


def load_config(fs: RunFS) -> RunConfig:
    """The saved configuration; ValueError when config.json is not JSON or its content does
    not match the hash saved with it (a damaged byte that still parses)."""
    raw = json.loads(fs.read_bytes(CONFIG_FILE))
    # Of the configuration as saved (not as today's schema would normalise it: a run saved by
    # an older version still reads).
    if "content_sha256" in raw and raw["content_sha256"] != content_sha256(raw["config"]):
        raise ValueError(f"{fs.url(CONFIG_FILE)}: its content does not match its own checksum")
    return parse_config(raw["config"], fs.url(CONFIG_FILE))
