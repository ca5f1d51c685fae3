"""The resolved run configuration: typed, validated, saved beside the artifacts with its hash.

Unknown keys are errors (a typo must not silently fall back to a default). Older saved configs
load with defaults for keys they lack.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, fields, is_dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from d3s_core.presets import Preset, get_preset
from d3s_core.synthesis import SynthesisConfig
from d3s_core.teachers import TeacherTrainConfig

from .fs import RunFS
from .urls import check_no_credentials

CONFIG_FILE = "config.json"
SCHEMA_VERSION = 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(Strict):
    """kind: "mnist5k" (bundled real digits), "imagefolder" (train/<class>/*.ext tree; `path`
    and optionally `val_path`), "webdataset" (tar shards of KEY.jpg + KEY.cls samples; `path`
    and `val_path`: a folder, a brace pattern `.../train-{000000..000146}.tar` or a tar file,
    local or an fsspec URL), or "synthetic" (random tensors for tests)."""

    kind: Literal["mnist5k", "imagefolder", "webdataset", "synthetic"] = "mnist5k"
    path: str | None = None
    val_path: str | None = None
    synthetic_size: int = 256
    test_fraction: float = 0.2


class TeachersSpec(Strict):
    """import_from: existing weights used as the teachers as they are (one file per teacher);
    init_from: weights training starts from (the classifier is re-initialised if its class
    count differs), as the paper's ImageNet-21K teachers start from ImageNet-1K ones."""

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
    init: Literal["noise", "real"] = "noise"
    params: dict[str, Any] = {}


class LabelsSpec(Strict):
    """teachers: "ensemble" labels with the mean logits of all M teachers (ENL, Sec. 4.3);
    "single" with teacher 0 alone (the ablation of Fig. 3a)."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    format: Literal["fp32", "fp16", "topk"] = "fp32"
    topk: int = Field(10, ge=1)
    teachers: Literal["ensemble", "single"] = "ensemble"


class ValidationSpec(Strict):
    """random_real_baseline: also validate a random real subset of IPC images per class,
    labelled the same way (the baseline every distillation method must beat)."""

    students: int = Field(2, ge=1)
    random_real_baseline: bool = False
    arch: str | None = None
    epochs: int | None = None
    checkpoint_every_epochs: int = Field(10, ge=1)


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

    schema_version: int = SCHEMA_VERSION
    name: str = "d3s"
    preset: str = "demo-mnist"
    seed: int = 0
    device: str = "cpu"
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    teachers: TeachersSpec = Field(default_factory=TeachersSpec)
    stats: StatsSpec = Field(default_factory=StatsSpec)
    synthesis: SynthesisSpec = Field(default_factory=SynthesisSpec)
    labels: LabelsSpec = Field(default_factory=LabelsSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    dask: DaskSpec | None = None
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)

    # -- resolved pieces -----------------------------------------------------------------
    def preset_obj(self) -> Preset:
        return get_preset(self.preset)

    def teacher_train(self) -> TeacherTrainConfig:
        return _override(self.preset_obj().teacher, self.teachers.train, "teachers.train")

    def synthesis_cfg(self) -> SynthesisConfig:
        return _override(self.preset_obj().synthesis, self.synthesis.params, "synthesis.params")

    def student_arch(self) -> str:
        """Validation students' architecture: the config's, else the preset's."""
        return self.validation.arch or self.preset_obj().student.arch

    def config_hash(self) -> str:
        results = self.model_dump(mode="json", exclude={"storage", "dask", "distributed"})
        return hashlib.sha256(canonical_json(results)).hexdigest()


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
        if allowed and v not in allowed:
            raise ValueError(f"{where}.{k}: {v!r} is not one of {list(allowed)}")
        values[k] = tuple(v) if isinstance(values[k], tuple) else v
    return type(base)(**values)


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


def parse_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a config dict; errors name the offending field and the source."""
    try:
        cfg = RunConfig.model_validate(data)
        _check(cfg)
        cfg.preset_obj()
        cfg.teacher_train()
        cfg.synthesis_cfg()
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise ValueError(f"{source}: invalid configuration: {problems}") from None
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return cfg


def save_config(fs: RunFS, cfg: RunConfig) -> None:
    """Write config.json (with its hash) once; a different config for an existing run is an
    error, so a resumed run can never mix two configurations."""
    payload = {
        "config": cfg.model_dump(mode="json"),
        "config_hash": cfg.config_hash(),
        "run_id": uuid.uuid4().hex,  # tells this run from a deleted and recreated one
    }
    if fs.exists(CONFIG_FILE):
        existing = load_config(fs)
        if existing.config_hash() != cfg.config_hash():
            raise ValueError(
                f"{fs.url(CONFIG_FILE)}: this run was started with a different configuration "
                f"(hash {existing.config_hash()[:12]} vs {cfg.config_hash()[:12]}); "
                "use a new root or the same configuration"
            )
        return
    fs.write_bytes(CONFIG_FILE, json.dumps(payload, indent=2, sort_keys=True).encode())


def run_id(fs: RunFS) -> str:
    return str(json.loads(fs.read_bytes(CONFIG_FILE))["run_id"])


def load_config(fs: RunFS) -> RunConfig:
    raw = json.loads(fs.read_bytes(CONFIG_FILE))
    return parse_config(raw["config"], fs.url(CONFIG_FILE))
