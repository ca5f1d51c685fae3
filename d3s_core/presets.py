"""The paper's hyperparameters as named presets (Tables 8, 9, 10), plus a CPU demo preset."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .optim import OptimizerName, ScheduleName
from .synthesis import IMAGENET_MEAN, IMAGENET_STD, SynthesisConfig
from .teachers import TeacherTrainConfig

__all__ = [
    "DEMO_MNIST",
    "DataShape",
    "IMAGENET_1K",
    "IMAGENET_21K",
    "LabelConfig",
    "MNIST_MEAN",
    "MNIST_STD",
    "PRESETS",
    "Preset",
    "SCALE_21K",
    "StudentConfig",
    "TINY_IMAGENET",
    "fit_to_data",
    "get_preset",
]

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


@dataclass(frozen=True)
class LabelConfig:
    """Ensemble labelling (Alg. 2): labelled epochs E, batch size, augmentation."""

    epochs: int = 300
    batch_size: int = 128
    min_crop_scale: float = 0.08
    flip: bool = True


@dataclass(frozen=True)
class StudentConfig:
    """Validation (Alg. 4, Table 10)."""

    arch: str = "resnet18"
    optimizer: OptimizerName = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    epochs: int = 300
    schedule: ScheduleName = "cosine"
    temperature: float = 20.0
    students: int = 5


@dataclass(frozen=True)
class Preset:
    """One dataset's whole recipe."""

    name: str
    num_classes: int
    image_size: int
    in_chans: int
    arch: str
    low_res: bool
    width: int
    teachers: int
    ipc: int
    synthesis_batch: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    teacher: TeacherTrainConfig
    synthesis: SynthesisConfig
    labels: LabelConfig
    student: StudentConfig = field(default_factory=StudentConfig)
    # The data the recipe was made for: its name and training-set size (the teachers' recipe
    # was tuned for that many images; `recipe_warnings` compares a run's data with it).
    dataset: str = ""
    train_images: int = 0


@dataclass(frozen=True)
class DataShape:
    """What a run takes from its data (or the config's declarations): class count, channels,
    image side, the resize rule (short side to image_size * crop_ratio, centre crop) and the
    per-channel normalisation (pixel / 255 - mean) / std."""

    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_ratio: float = 8 / 7

    def __post_init__(self) -> None:
        for name in ("num_classes", "in_chans", "image_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {v!r} must be an integer >= 1")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != self.in_chans:
                raise ValueError(
                    f"{name}: {len(getattr(self, name))} values for {self.in_chans} channels"
                )
        if any(not s > 0 for s in self.std):
            raise ValueError(f"std: {list(self.std)} must all be > 0")
        if not self.crop_ratio >= 1:
            raise ValueError(f"crop_ratio: {self.crop_ratio!r} must be >= 1")


def fit_to_data(
    p: Preset,
    shape: DataShape,
    *,
    arch: str,
    width: int,
    low_res: bool,
    teachers: int,
    ipc: int,
    synthesis_batch: int,
    synthesis: SynthesisConfig,
    labels: LabelConfig,
    student: StudentConfig,
) -> Preset:
    """The recipe `p` applied to a run's data: the data's shape and normalisation, the run's
    model and recipe fields (the preset's unless overridden). The synthesis recipe's mean/std
    (the normalised space it clamps to) become the data's."""
    return replace(
        p,
        num_classes=shape.num_classes,
        in_chans=shape.in_chans,
        image_size=shape.image_size,
        mean=tuple(shape.mean),
        std=tuple(shape.std),
        arch=arch,
        width=width,
        low_res=low_res,
        teachers=teachers,
        ipc=ipc,
        synthesis_batch=synthesis_batch,
        synthesis=replace(synthesis, mean=tuple(shape.mean), std=tuple(shape.std)),
        labels=labels,
        student=student,
    )


def _synthesis(
    lr: float, iterations: int, mean: tuple[float, ...], std: tuple[float, ...], flip: bool = True
) -> SynthesisConfig:
    return SynthesisConfig(iterations=iterations, lr=lr, mean=mean, std=std, flip=flip)


# ImageNet-1K (Tables 8-10): the base every other recipe is derived from, field by field.
IMAGENET_1K = Preset(
    name="imagenet-1k",
    num_classes=1000,
    image_size=224,
    in_chans=3,
    arch="resnet18",
    low_res=False,
    width=64,
    teachers=5,
    ipc=10,
    synthesis_batch=200,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    teacher=TeacherTrainConfig(
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
        batch_size=256,
        epochs=90,
        schedule="step",
        step_every_epochs=30,
        gamma=0.1,
    ),
    synthesis=_synthesis(0.25, 1000, IMAGENET_MEAN, IMAGENET_STD),
    labels=LabelConfig(epochs=300, batch_size=128),
    student=StudentConfig(
        optimizer="adamw",
        lr=1e-3,
        weight_decay=1e-4,
        batch_size=128,
        epochs=300,
        schedule="cosine",
    ),
    dataset="imagenet-1k",
    train_images=1281167,
)

# Tiny-ImageNet: 64 px with the low-resolution stem (App. D.2), SGD throughout.
TINY_IMAGENET = replace(
    IMAGENET_1K,
    name="tiny-imagenet",
    num_classes=200,
    image_size=64,
    low_res=True,
    ipc=50,
    teacher=replace(IMAGENET_1K.teacher, lr=0.2, epochs=50, schedule="cosine", warmup_epochs=5),
    synthesis=replace(IMAGENET_1K.synthesis, lr=0.4, iterations=4000),
    labels=LabelConfig(epochs=100, batch_size=64),
    student=replace(
        IMAGENET_1K.student, optimizer="sgd", lr=0.2, momentum=0.9, batch_size=64, epochs=100
    ),
    dataset="tiny-imagenet",
    train_images=100000,
)

# ImageNet-21K (winter 21, 10,450 classes). Teachers start from ImageNet-1K weights
# (Table 8), imported rather than trained.
IMAGENET_21K = replace(
    IMAGENET_1K,
    name="imagenet-21k",
    num_classes=10450,
    teacher=TeacherTrainConfig(
        optimizer="adamw",
        lr=3e-4,
        weight_decay=1e-4,
        batch_size=1024,
        epochs=80,
        schedule="onecycle",
    ),
    synthesis=replace(IMAGENET_1K.synthesis, lr=0.05),
    student=replace(IMAGENET_1K.student, lr=2e-3, students=3),
    dataset="imagenet-21k",
    # Ridnik et al.'s ImageNet-21K-P, winter-21 release (the paper's 21K): 10,450 classes,
    # 11,060,239 train / 522,500 validation images (timm/imagenet-w21-p).
    train_images=11060239,
)

# CPU demo on the real MNIST-5k digits: a width-16 ResNet-18 layout with a 3x3 stem.
# Horizontal flip is off: it does not preserve digit labels.
DEMO_MNIST = replace(
    IMAGENET_1K,
    name="demo-mnist",
    num_classes=10,
    image_size=28,
    in_chans=1,
    arch="small_resnet",
    low_res=True,
    width=16,
    teachers=2,
    synthesis_batch=50,
    mean=MNIST_MEAN,
    std=MNIST_STD,
    teacher=replace(
        TINY_IMAGENET.teacher,
        lr=0.05,
        weight_decay=5e-4,
        batch_size=128,
        epochs=4,
        warmup_epochs=0,
        min_crop_scale=0.5,
        flip=False,
    ),
    synthesis=replace(_synthesis(0.1, 200, MNIST_MEAN, MNIST_STD, flip=False), min_crop_scale=0.5),
    labels=LabelConfig(epochs=30, batch_size=50, min_crop_scale=0.5, flip=False),
    student=replace(
        IMAGENET_1K.student, arch="small_resnet", lr=2e-3, batch_size=50, epochs=100, students=2
    ),
    dataset="mnist5k",
    train_images=4000,
)

# ImageNet-21K's shape (10,450 classes, IPC 10: 104,500 images in 523 batches of 200,
# 300 label epochs) at 16 px with a width-4 network: the pipeline's own costs (memory,
# I/O, per-unit overhead) at the real class count and set size, in seconds of compute
# (tests/test_scale.py, bench/bench_scale.py). Not a recipe for real data.
SCALE_21K = replace(
    IMAGENET_21K,
    name="scale-21k",
    image_size=16,
    arch="small_resnet",
    low_res=True,
    width=4,
    teachers=1,
    teacher=replace(
        IMAGENET_1K.teacher, batch_size=1024, epochs=1, schedule="cosine", warmup_epochs=0
    ),
    synthesis=replace(IMAGENET_21K.synthesis, iterations=2),
    student=replace(IMAGENET_1K.student, arch="small_resnet", students=1),
    dataset="synthetic",
    train_images=104500,
)

PRESETS: dict[str, Preset] = {
    p.name: p for p in (TINY_IMAGENET, IMAGENET_1K, IMAGENET_21K, DEMO_MNIST, SCALE_21K)
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}") from None
