"""What a stage's working set is computed from, for `d3s plan` (tasks/plan/memory.py).

Each stage module states the memory its runner allocates in a function `..._working_set(w)`
next to the runner, and the stage table names it (tasks/stage_table.py, `Stage.plan`): when a
stage changes what it holds, the formula beside it changes with it. The planner builds a `Work`
(the config, the recipe fitted to the data, model facts measured on the meta device, counts)
and adds the process baseline to the largest phase. Bytes throughout; a phase is
{"host": {what: bytes}, "device": {what: bytes}} (on device "cpu" both are host memory).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from d3s_core.presets import Preset
    from storage.config import RunConfig

F32, F64 = 4, 8
# Host bytes per image of an epoch's index vectors (labels and students): its int64
# permutation, its batches as Python int lists (8-byte pointer + 28-byte int), and the label
# file's three index columns read back. The largest per-image cost of any stage.
EPOCH_INDEX_BYTES = 64
Phase = dict[str, dict[str, int]]


def phase(host: dict[str, Any], device: dict[str, Any]) -> Phase:
    return {
        "host": {k: int(v) for k, v in host.items()},
        "device": {k: int(v) for k, v in device.items()},
    }


@dataclass(frozen=True)
class Work:
    """The quantities a working set is written in (built by tasks/plan/memory.py).

    facts(arch): the model's per-image facts (tasks/plan/model.py ModelFacts: params,
    weight_bytes, channels, saved_train, saved_input, forward_live, largest_activation,
    largest_measured, penultimate); backward: the planner's calibration of a backward pass's
    gradient buffers in units of the largest activation ("train", "synthesis"); loader(batch):
    host bytes of the training-set reader; prefetch: DataLoader batches in flight;
    coreset_rows/coreset_dim: the largest class and the feature width of the coreset pass."""

    cfg: RunConfig
    p: Preset
    n: int  # distilled (or baseline) images of a set
    n_train: int
    shards: int
    facts: Callable[[str], Any]
    backward: dict[str, int]
    loader: Callable[[int], dict[str, int]]
    prefetch: int
    optimizer_slots: Callable[[str, float], int]  # parameter-sized tensors an optimiser keeps
    stats_bytes: Callable[[tuple[int, ...]], int]  # one teacher's per-layer mean + covariance
    coreset_rows: int
    coreset_dim: int

    @property
    def chw(self) -> int:
        return self.p.in_chans * self.p.image_size * self.p.image_size

    @property
    def teacher(self) -> Any:
        return self.facts(self.p.arch)

    @property
    def student(self) -> Any:
        return self.facts(self.cfg.student_arch())

    def student_train_device(self, what: str) -> dict[str, int]:
        """A training student's device working set: weights, grads, optimiser state, one batch
        of `what` with its crops and saved activations, backward buffers."""
        f, b, s = self.student, self.cfg.labels.batch_size, self.p.student
        batch = b * (2 * self.chw * F32 + f.saved_train)
        return {
            "weights + grads": f.weight_bytes + f.params * F32,
            "optimiser state": self.optimizer_slots(s.optimizer, s.momentum) * f.params * F32,
            f"batch x ({what} + crops + saved activations)": batch,
            "backward buffers": b * self.backward["train"] * f.largest_activation,
        }
