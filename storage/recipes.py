"""The typed sections of a run config that override a preset's recipe (the d3s_core dataclasses
TeacherTrainConfig, SynthesisConfig, LabelConfig, StudentConfig), and the strict base of every
config section. A recipe's ranges and choices are these types, written once: the dataclasses
check nothing, and what reaches them from a config came through here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from pydantic import Strict as StrictMode

from d3s_core.isu import IsuMode, TeacherChoice
from d3s_core.optim import OptimizerName, ScheduleName
from d3s_core.precision import AutocastMode
from d3s_core.presets import LabelConfig, StudentConfig
from d3s_core.stats import CovMatmul
from d3s_core.synthesis import LossKind, SynthesisConfig, SynthesisDtype
from d3s_core.teachers import TeacherTrainConfig

Count = Annotated[int, Field(ge=1)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]  # (0, 1]: crop scales, decay factors
Unit = Annotated[float, Field(ge=0, lt=1)]  # [0, 1): momenta, label smoothing
Recipe = TypeVar("Recipe", TeacherTrainConfig, SynthesisConfig, LabelConfig, StudentConfig)


class Strict(BaseModel):
    # strict: no coercion ("0.1" is not a number, 2.0 not an integer, true not 1);
    # allow_inf_nan=False: no NaN or infinity where a number is expected.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Overrides(Strict):
    """The keys of a preset's recipe (a d3s_core dataclass) that a config changes; None: the
    preset's. Dumped as the keys given, so config.json holds what was written."""

    WHERE: ClassVar[str]  # its config key
    ELSEWHERE: ClassVar[dict[str, str]] = {}  # recipe key -> where it is set instead

    @model_validator(mode="before")
    @classmethod
    def _not_here(cls, data: Any) -> Any:
        for key, why in cls.ELSEWHERE.items():
            if isinstance(data, dict) and key in data:
                raise ValueError(f"{cls.WHERE}.{key}: {why}")
        return data

    @model_serializer(mode="wrap")
    def _given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}

    def over(self, base: Recipe, **own: Any) -> Recipe:
        """`base` with the keys given here and the `own` keys that are not None."""
        mine = {k: getattr(self, k) for k in self.model_dump()}  # betas as a tuple
        return replace(base, **mine, **{k: v for k, v in own.items() if v is not None})


class TeacherTrain(Overrides):
    """teachers.train: TeacherTrainConfig (Table 8)."""

    WHERE = "teachers.train"
    optimizer: OptimizerName | None = None
    lr: Positive | None = None
    momentum: Unit | None = None
    weight_decay: NonNegative | None = None
    batch_size: Count | None = None
    epochs: Count | None = None
    schedule: ScheduleName | None = None
    warmup_epochs: Annotated[int, Field(ge=0)] | None = None
    step_every_epochs: Count | None = None
    gamma: Fraction | None = None
    min_crop_scale: Fraction | None = None
    flip: bool | None = None
    label_smoothing: Unit | None = None


class SynthesisParams(Overrides):
    """synthesis.params: SynthesisConfig (Table 9). lr 0 keeps the initial images (a baseline)."""

    WHERE = "synthesis.params"
    ELSEWHERE = {
        k: f"the normalisation is the data's; declare dataset.{k} instead" for k in ("mean", "std")
    }
    iterations: Count | None = None
    lr: NonNegative | None = None
    betas: Annotated[tuple[Unit, Unit], StrictMode(False)] | None = None  # a JSON list
    eps: Positive | None = None
    alpha: NonNegative | None = None
    ridge: Positive | None = None
    loss: LossKind | None = None
    isu: IsuMode | None = None
    teacher_choice: TeacherChoice | None = None
    min_crop_scale: Fraction | None = None
    curriculum_end: Fraction | None = None
    flip: bool | None = None
    autocast: AutocastMode | None = None
    channels_last: bool | None = None
    compile: bool | None = None
    dtype: SynthesisDtype | None = None
    cov_matmul: CovMatmul | None = None


class LabelParams(Overrides):
    """labels.params: LabelConfig's augmentation (its epochs and batch size are labels.*)."""

    WHERE = "labels.params"
    ELSEWHERE = {k: f"set labels.{k} instead" for k in ("epochs", "batch_size")}
    min_crop_scale: Fraction | None = None
    flip: bool | None = None


class StudentParams(Overrides):
    """validation.params: StudentConfig (Table 10) but for students, epochs and arch."""

    WHERE = "validation.params"
    ELSEWHERE = {k: f"set validation.{k} instead" for k in ("students", "epochs", "arch")}
    optimizer: OptimizerName | None = None
    lr: Positive | None = None
    momentum: Unit | None = None
    weight_decay: NonNegative | None = None
    batch_size: Count | None = None
    schedule: ScheduleName | None = None
    temperature: Positive | None = None


# config key of each recipe section, as a loc ("synthesis", "params") -> its typed overrides
RECIPES: dict[tuple[str, ...], type[Overrides]] = {
    tuple(m.WHERE.split(".")): m
    for m in (TeacherTrain, SynthesisParams, LabelParams, StudentParams)
}
