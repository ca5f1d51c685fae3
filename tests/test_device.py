"""Device placement and host-device syncs, checked without a GPU.

The hot paths run with every tensor on the "meta" device, which has shapes and dtypes but no
data: a CPU tensor meeting a meta tensor fails exactly where it would meet a CUDA tensor, and
anything that needs a device tensor's value on the host (`.item()`, `bool()`, `float()`,
`.cpu()`) is a host-device sync on CUDA. `SyncCounter` intercepts those on meta tensors, counts
them and answers with zeros, so a whole loop runs and its syncs can be counted.
"""

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import d3s_core.synthesis as synthesis_mod
from d3s_core.isu import RunningStats
from d3s_core.labelling import label_epoch
from d3s_core.models import build_model
from d3s_core.stats import SuffStats
from d3s_core.students import evaluate_top1, train_student_epoch
from d3s_core.synthesis import finish_batch, init_state, run_iterations
from storage.config import parse_config
from storage.run import open_run, syn_isu
from storage.states import save_state
from tasks.stages.synthesis import _running_after

from .configs import SMALL
from .helpers import CFG, SIZE, measured

META = torch.device("meta")
ITERATIONS = 6


class SyncCounter(TorchDispatchMode):
    """Counts reads of meta tensors' values on the host (scalars and copies to the CPU) and
    answers them with zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.scalars = 0
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        on_meta = src is not None and src.device.type == "meta"
        if func is torch.ops.aten._local_scalar_dense.default and on_meta:
            self.scalars += 1
            return False if src.dtype == torch.bool else 0
        if func is torch.ops.aten._to_copy.default and on_meta:
            target = kwargs.get("device")
            if target is not None and torch.device(target).type == "cpu":
                self.copies += 1
                dtype = kwargs.get("dtype") or src.dtype
                return torch.zeros(src.shape, dtype=dtype)
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return self.scalars + self.copies


@pytest.fixture(autouse=True)
def _meta_values():
    """Every test here runs under a SyncCounter (values of meta tensors read as zeros); the
    counting tests nest their own."""
    with SyncCounter() as outer:
        yield outer


def meta_teacher(seed=0):
    t = measured(seed)
    t.model.to(META)
    t.targets = [x.to(META) for x in t.targets]
    return t


def meta_state(b):
    return init_state(b, torch.arange(6) % 4, (3, SIZE, SIZE), seed=7 + b, device=META)


def after_batch_1(teachers, cfg):
    """Batch 1 on meta, then the ISU statistics it leaves (on meta)."""
    running = RunningStats.zeros([t.channels for t in teachers], META)
    state, _ = run_iterations(meta_state(1), teachers, running, cfg)
    return finish_batch(state, teachers, running, cfg)


@pytest.mark.parametrize("isu", ["paper", "exact"])
def test_isu_batch_2_runs_on_the_device_of_the_images(isu):
    """Batch 2 (ISU weight 1/2: the running statistics are mixed in) on a non-CPU device."""
    teachers = [meta_teacher(0), meta_teacher(1)]
    cfg = dataclasses.replace(CFG, iterations=ITERATIONS, isu=isu)
    running = after_batch_1(teachers, cfg)
    assert running.device == META and running.batches_done == 1
    state, hist = run_iterations(meta_state(2), teachers, running, cfg)
    assert state.images.device == META and len(hist) == ITERATIONS
    assert finish_batch(state, teachers, running, cfg).device == META


def test_cpu_statistics_meeting_device_images_fail_on_cpu(monkeypatch):
    """The defect this file exists for: ISU statistics built on the CPU (as the stage did) and
    mixed with device batch statistics. The guard names it; without the guard the maths fails
    on meta as it would on CUDA."""
    teachers = [meta_teacher(0)]
    cfg = dataclasses.replace(CFG, iterations=2)
    on_cpu = RunningStats.zeros([t.channels for t in teachers])
    on_cpu.batches_done, on_cpu.images_done = 1, 6
    with pytest.raises(ValueError, match="ISU statistics are on cpu"):
        run_iterations(meta_state(2), teachers, on_cpu, cfg)
    monkeypatch.setattr(RunningStats, "device", property(lambda self: None))
    with pytest.raises(RuntimeError, match="device"):
        run_iterations(meta_state(2), teachers, on_cpu, cfg)


def test_stage_loads_isu_statistics_onto_the_run_device(tmp_path):
    cfg = parse_config({**SMALL, "device": "meta"})
    channels = [[3, 5]]
    with open_run(tmp_path / "run", cfg) as run:
        assert _running_after(run, 0, [], channels, None).device == META
        zeros = RunningStats.zeros(channels)  # written by a batch: CPU tensors in the file
        state = {"means": zeros.means, "covs": zeros.covs, "batches_done": 1, "images_done": 6}
        save_state(run.fs, syn_isu(1), state)
        loaded = _running_after(run, 1, [], channels, None)
    assert loaded.device == META and loaded.batches_done == 1
    assert all(c.device == META for ts in loaded.covs for c in ts)


@pytest.mark.parametrize("until", [1, ITERATIONS])
def test_one_sync_per_checkpoint_interval(until):
    """Synthesis: one host-device sync per `run_iterations` call, whatever its length (the
    draws are made up front, the Cholesky checked once); finish_batch none."""
    teachers = [meta_teacher(0), meta_teacher(1)]
    for choice in ("per_batch", "per_iteration"):
        cfg = dataclasses.replace(CFG, iterations=ITERATIONS, teacher_choice=choice, isu="exact")
        running = RunningStats.zeros([t.channels for t in teachers], META)
        with SyncCounter() as syncs:
            state, hist = run_iterations(meta_state(1), teachers, running, cfg, until)
        assert len(hist) == until and (syncs.scalars, syncs.copies) == (1, 0), choice
        with SyncCounter() as syncs:
            run_iterations(state, teachers, running, cfg)
            finish_batch(state, teachers, running, cfg)
        assert syncs.total == 1


def test_a_failed_cholesky_redoes_the_interval_step_by_step(monkeypatch):
    """When the sync-free pass reports a failed Cholesky, the interval is redone from its start
    with per-step checking: the result is the one a per-step check gives (here: the same as
    without the failure, since the checked KL is the same), from the same draws."""
    teachers = [measured(0), measured(1)]
    cfg = dataclasses.replace(
        CFG, iterations=ITERATIONS, teacher_choice="per_iteration", dtype="float64"
    )
    running = RunningStats.zeros([t.channels for t in teachers])

    def fresh():
        return init_state(1, torch.arange(6) % 4, (3, SIZE, SIZE), 7, dtype=torch.float64)

    ref, ref_hist = run_iterations(fresh(), teachers, running, cfg, 4)
    calls = {"unchecked": 0, "checked": 0}
    unchecked, checked = synthesis_mod.kl_layers_unchecked, synthesis_mod.kl_layers

    def failing(*args, **kwargs):
        calls["unchecked"] += 1
        kl, failed = unchecked(*args, **kwargs)
        return kl, failed | (calls["unchecked"] == 2)  # step 2 of the interval "fails"

    def counting(*args, **kwargs):
        calls["checked"] += 1
        return checked(*args, **kwargs)

    monkeypatch.setattr(synthesis_mod, "kl_layers_unchecked", failing)
    monkeypatch.setattr(synthesis_mod, "kl_layers", counting)
    got, hist = run_iterations(fresh(), teachers, running, cfg, 4)
    assert calls == {"unchecked": 4, "checked": 4}  # the whole interval, redone checked
    assert got.iteration == 4 and len(hist) == 4
    assert [h.teacher for h in hist] == [h.teacher for h in ref_hist]
    assert torch.equal(got.rng_state, ref.rng_state)
    for name in ("images", "exp_avg", "exp_avg_sq"):
        a, b = getattr(got, name), getattr(ref, name)
        assert (a - b).abs().max() <= 1e-12 * b.abs().max(), name


def test_labels_students_and_stats_hot_paths_on_the_device():
    """Labelling, a student epoch, evaluation and a statistics batch run with images, models
    and labels on a non-CPU device; their host syncs are per batch (labels to the host) or per
    epoch (the mean loss, the accuracy), not per step."""
    images = torch.randn(10, 3, SIZE, SIZE).to(META)
    teachers = [measured(0).model.to(META), measured(1).model.to(META)]
    with SyncCounter() as syncs:
        labels = label_epoch(images, teachers, 0, seed=1, batch_size=4)
    batches = 3
    assert syncs.copies == batches and syncs.scalars == 0  # one copy of the logits per batch
    labels.logits = torch.randn_like(labels.logits)
    student = build_model("small_resnet", 4, in_chans=3, low_res=True, width=4).to(META)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    with SyncCounter() as syncs:
        train_student_epoch(student, opt, images, labels)
    assert syncs.total == 1  # the epoch's mean loss
    with SyncCounter() as syncs:
        evaluate_top1(student, images, (torch.arange(10) % 4).to(META), batch_size=4)
    assert syncs.total == 1  # the accuracy
    act = torch.randn(4, 8, 5, 5).to(META)
    with SyncCounter() as syncs:
        s = SuffStats.from_batch(act)
    assert s.mean.device == META and syncs.total == 0


def test_cudnn_autotune_only_on_cuda(monkeypatch):
    from d3s_core.precision import enable_cudnn_autotune

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    enable_cudnn_autotune("cpu")
    assert torch.backends.cudnn.benchmark is False
    enable_cudnn_autotune("cuda:0")  # the flag needs no GPU to be set
    assert torch.backends.cudnn.benchmark is True
