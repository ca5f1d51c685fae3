"""Data-parallel synthesis over 2 gloo processes on CPU equals the single-process run.

What is asserted holds on every CPU, whatever its SIMD width or thread count: in float64 (the
moments and their gradients, and whole synthesis trajectories with `dtype="float64"`) the
ranks equal one process to rounding; in float32 only what one iteration or the loss bounds (the
first iteration's loss and gradient, loss curves within a tolerance). Two float32 runs that
differ in ranks or threads are not compared pixel by pixel after several Adam steps: pixels
whose gradient is rounding noise move by about lr either way, so such a comparison measures
chaos, not correctness. Every comparison runs with 1 and 4 threads per process: one of the two
in the default tier (4 threads for the cheap ones, 1 for the slow float64 trajectories), the
other in the slow tier. The synthesis stage is launched with torchrun, including (slow tier) a
SIGKILL of the whole job and a relaunch that resumes from its checkpoint.
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from d3s_core.augment import apply_crops, curriculum_scale, draw_crops
from d3s_core.distributed import World, gather_rows, label_loss_across, moments_across
from d3s_core.isu import RunningStats, isu_weight
from d3s_core.loss import label_loss
from d3s_core.stats import Moments
from d3s_core.synthesis import (
    finish_batch,
    gather_state,
    init_state,
    run_iterations,
    synthesis_loss,
)
from storage.arrays import read_images
from storage.config import parse_config
from storage.fs import RunFS
from storage.manifest import Manifest
from storage.run import SYN_IMAGES, open_run, syn_commit
from tasks.stages import STAGES

from .configs import SMALL
from .helpers import CFG, measured

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
THREADS = [1, 4]  # per process: results must not depend on it
# float64: moments, loss and gradients, and whole float64 trajectories (the largest differences
# measured are printed with -s).
F64_TOL = 1e-12
TRAJECTORY_F64_REL = 1e-9  # relative L2 of float64 images after 8 Adam steps per batch
SIZE = 32
# float32, one iteration from the same images: loss and gradient differ by summation order only.
STEP_F32_LOSS_REL = 1e-5
STEP_F32_GRAD_REL = 1e-3
# float32 loss curves over 8 iterations of two runs that differ in ranks or threads.
CURVE_F32_REL = 2e-2


def _spawn(fn, tmp_path, *args, threads=1):
    """Run fn(world, *args) in WORLD gloo processes of `threads` threads each."""
    init = tmp_path / f"store-{threads}"
    out = tmp_path / f"out-{threads}"
    out.mkdir(exist_ok=True)
    mp.start_processes(
        _worker,
        args=(fn, str(init), str(out), threads, args),
        nprocs=WORLD,
        start_method="spawn",
    )
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _worker(rank, fn, init, out, threads, args):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    try:
        world = World.current()
        assert world is not None and world.rank == rank
        torch.save(fn(world, *args), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def thread_variants(default: int) -> list:
    """THREADS as parameters: `default` in the default tier, the others slow."""
    return [
        pytest.param(n, id=f"threads{n}", marks=() if n == default else pytest.mark.slow)
        for n in THREADS
    ]


@pytest.fixture
def threads(request):
    """This process's torch threads for the test (restored after it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _activations():
    g = torch.Generator().manual_seed(3)
    x4 = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) * 2 + 1
    x2 = torch.randn(7, 4, generator=g, dtype=torch.float64) - 3
    logits = torch.randn(5, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 5, 2, 2, 1])
    return x4, x2, logits, labels


def _loss(moments, ce):
    """A loss that uses every entry of both moments nonlinearly."""
    total = ce
    for k, (mu, cov) in enumerate(moments):
        w = torch.arange(cov.numel(), dtype=cov.dtype).view_as(cov) / cov.numel()
        total = total + (mu.sin() * (k + 1)).sum() + (cov * w).sum() + cov.square().sum()
    return total


def _moments_rank(world):
    x4, x2, logits, labels = _activations()
    parts = [t[world.rows(len(t))].clone().requires_grad_(True) for t in (x4, x2, logits)]
    moments = moments_across(parts[:2], world)
    ce = label_loss_across(parts[2], labels[world.rows(len(labels))], world)
    loss = _loss(moments, ce)
    grads = torch.autograd.grad(loss, parts)
    whole = [gather_rows(g, world, len(t)) for g, t in zip(grads, (x4, x2, logits), strict=True)]
    moments = [(mu.detach(), cov.detach()) for mu, cov in moments]
    return {"moments": moments, "ce": ce.detach(), "loss": loss.detach(), "grads": whole}


@pytest.mark.parametrize("threads", thread_variants(4), indirect=True)
def test_all_reduced_moments_and_gradients_equal_single_process(tmp_path, threads):
    x4, x2, logits, labels = _activations()
    inputs = [t.clone().requires_grad_(True) for t in (x4, x2, logits)]
    moments = [Moments.apply(x) for x in inputs[:2]]
    ce = label_loss(inputs[2], labels)
    loss = _loss(moments, ce)
    grads = torch.autograd.grad(loss, inputs)
    loss, ce = loss.detach(), ce.detach()
    moments = [(mu.detach(), cov.detach()) for mu, cov in moments]
    # The single-process moments are themselves checked against torch.cov here.
    s = x4.permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.allclose(moments[0][1], torch.cov(s.T, correction=0), atol=F64_TOL)

    ranks = _spawn(_moments_rank, tmp_path, threads=threads)
    worst = max(
        float((a - b).abs().max())
        for got in ranks
        for pair, ref in zip(got["moments"], moments, strict=True)
        for a, b in zip(pair, ref, strict=True)
    )
    worst_grad = max(
        float((g - r).abs().max() / r.abs().max())
        for g, r in zip(ranks[0]["grads"], grads, strict=True)
    )
    print(
        f"float64 moments: max |difference| {worst:.1e}; gradients: max relative {worst_grad:.1e}"
    )
    for r, got in enumerate(ranks):
        assert abs(float(got["loss"]) - float(loss)) < F64_TOL, r
        assert abs(float(got["ce"]) - float(ce)) < F64_TOL, r  # global mean, 5 rows as 3 + 2
        for (mu, cov), (mu_ref, cov_ref) in zip(got["moments"], moments, strict=True):
            assert mu.dtype == torch.float64
            assert torch.allclose(mu, mu_ref, rtol=0, atol=F64_TOL)
            assert torch.allclose(cov, cov_ref, rtol=0, atol=F64_TOL)
    # Gradients gathered from both ranks: each rank's rows get the single-process gradient,
    # not world-size times it.
    for g, g_ref in zip(ranks[0]["grads"], grads, strict=True):
        assert torch.allclose(g, g_ref, rtol=0, atol=F64_TOL * max(1.0, float(g_ref.abs().max())))
    assert ranks[1]["grads"] == [None, None, None]


def measured_teacher(seed):
    """A tiny teacher and its Gaussians at 32 px: 8 images give every measured layer more
    samples than channels, so the batch covariances are full rank (with fewer, Eq. 1's
    log-determinant amplifies float32 rounding by up to 1/ridge and no two float32 runs agree
    for long, even in one process)."""
    return measured(seed, size=SIZE)


def _two_batches(world, n, dtype="float32"):
    """Batches 1 and 2 with per-iteration teachers, exact ISU and an uneven split of n rows;
    also the loss and gradient of iteration 1 of batch 1 (the same images everywhere)."""
    teachers = [measured_teacher(0), measured_teacher(1)]
    cfg = dataclasses.replace(
        CFG, iterations=8, teacher_choice="per_iteration", isu="exact", dtype=dtype
    )
    running = RunningStats.zeros([t.channels for t in teachers])
    out = {}
    for b in (1, 2):
        labels = torch.arange(n) % 4
        state = init_state(
            b, labels, (3, SIZE, SIZE), seed=7 + b, world=world, dtype=cfg.torch_dtype
        )
        if b == 1:
            out["step1"] = _first_step(state, teachers, running, cfg, world)
        images, hist = [], []
        for it in range(cfg.iterations):
            state, step = run_iterations(state, teachers, running, cfg, it + 1, world)
            hist += step
            whole = state if world is None else gather_state(state, world)
            images.append(None if whole is None else whole.images.clone())
        running = finish_batch(state, teachers, running, cfg, world)
        out[b] = {
            "images": images,
            "exp_avg_sq": None if whole is None else whole.exp_avg_sq,
            "losses": torch.stack([h.loss for h in hist]),
            "layers": torch.stack([h.layer_losses for h in hist]),
            "teachers": [h.teacher for h in hist],
        }
    out["running_covs"] = running.covs
    return out


def _first_step(state, teachers, running, cfg, world):
    """Loss and gradient (whole batch, gathered on rank 0) of iteration 1's objective."""
    g = torch.Generator().manual_seed(0)
    g.set_state(state.rng_state)
    m = int(torch.randint(len(teachers), (1,), generator=g))  # as run_iterations draws it
    scale = curriculum_scale(0, cfg.iterations, cfg.min_crop_scale, cfg.curriculum_end)
    boxes, flips = draw_crops(len(state.labels), g, scale, cfg.flip)
    rows = slice(None) if world is None else world.rows(len(state.labels))
    x = state.images.clone().requires_grad_(True)
    teachers[m].configure(dtype=cfg.torch_dtype)
    w = isu_weight(cfg.isu, state.batch_index, running.images_done, len(state.labels))
    loss, _, _, _ = synthesis_loss(
        teachers[m],
        apply_crops(x, boxes[rows], flips[rows]),
        state.labels[rows],
        running.means[m],
        running.covs[m],
        w,
        cfg,
        world,
    )
    (grad,) = torch.autograd.grad(loss, x)
    whole = grad if world is None else gather_rows(grad, world, len(state.labels))
    return {"loss": loss.detach(), "grad": whole}


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("threads", thread_variants(1), indirect=True)
def test_float64_synthesis_on_two_ranks_is_the_single_process_trajectory(tmp_path, threads):
    """Exactness: 8 Adam steps of 2 batches with ISU, float64, ranks and threads changed."""
    n = 9  # rows 0..4 on rank 0, 5..8 on rank 1
    single = _two_batches(None, n, "float64")
    ranks = _spawn(_two_batches, tmp_path, n, "float64", threads=threads)
    worst = 0.0
    for b in (1, 2):
        got, ref = ranks[0][b], single[b]
        for it, (x, x_ref) in enumerate(zip(got["images"], ref["images"], strict=True)):
            assert x.dtype == torch.float64
            worst = max(worst, rel(x, x_ref))
            assert rel(x, x_ref) < TRAJECTORY_F64_REL, f"batch {b} iteration {it + 1}"
        assert rel(got["exp_avg_sq"], ref["exp_avg_sq"]) < TRAJECTORY_F64_REL
        assert got["teachers"] == ref["teachers"]
        for r in range(WORLD):  # loss history: the global values, the same on every rank
            assert torch.equal(ranks[r][b]["losses"], got["losses"])
            assert torch.allclose(ranks[r][b]["losses"], ref["losses"], rtol=TRAJECTORY_F64_REL)
            assert torch.allclose(
                ranks[r][b]["layers"], ref["layers"], rtol=TRAJECTORY_F64_REL, atol=1e-12
            )
        assert ranks[1][b]["images"] == [None] * len(got["images"])
    print(f"float64, {threads} threads per rank: images max relative L2 difference {worst:.1e}")
    for m in range(2):
        for layer, cov in enumerate(single["running_covs"][m]):
            # ISU statistics: the same on every rank, and those of the whole batch
            assert torch.equal(
                ranks[0]["running_covs"][m][layer], ranks[1]["running_covs"][m][layer]
            )
            assert rel(ranks[1]["running_covs"][m][layer], cov) < TRAJECTORY_F64_REL


@pytest.mark.parametrize("threads", thread_variants(4), indirect=True)
def test_float32_synthesis_on_two_ranks_agrees_in_one_step_and_in_loss(tmp_path, threads):
    """float32, the production dtype: iteration 1 (the same images) gives the single process's
    loss and gradient to summation order; the loss curves agree within CURVE_F32_REL."""
    n = 9
    single = _two_batches(None, n)
    ranks = _spawn(_two_batches, tmp_path, n, threads=threads)
    step, ref = ranks[0]["step1"], single["step1"]
    loss_rel = abs(float(step["loss"] / ref["loss"]) - 1)
    grad_rel = rel(step["grad"], ref["grad"])
    print(f"float32 iteration 1, {threads} threads: loss {loss_rel:.1e}, gradient {grad_rel:.1e}")
    assert loss_rel < STEP_F32_LOSS_REL and grad_rel < STEP_F32_GRAD_REL
    assert abs(float(ranks[0][1]["losses"][0] / single[1]["losses"][0]) - 1) < STEP_F32_LOSS_REL
    for b in (1, 2):
        got = ranks[0][b]
        assert got["teachers"] == single[b]["teachers"]
        curve = float(((got["losses"] - single[b]["losses"]) / single[b]["losses"]).abs().max())
        print(f"float32 batch {b}: loss curves differ by at most {curve:.1e} (relative)")
        assert curve < CURVE_F32_REL
        for r in range(WORLD):
            assert torch.equal(ranks[r][b]["losses"], got["losses"])
            assert torch.isfinite(got["images"][-1]).all()


# Stage level: torchrun, 2 gloo ranks, the tiny SMALL run with mid-batch checkpoints.
ITERATIONS = 8
STAGE_CONFIG = {
    **SMALL,
    "name": "distributed-test",
    "synthesis": {
        "ipc": 2,
        "batch_size": 10,
        "checkpoint_every": 2,
        "checkpoint_seconds": 0,
        "params": {"iterations": ITERATIONS},
    },
}
# The same run in float64: its trajectories can be compared across ranks and threads.
STAGE_CONFIG_F64 = {
    **STAGE_CONFIG,
    "synthesis": {
        **STAGE_CONFIG["synthesis"],
        "params": {"iterations": ITERATIONS, "dtype": "float64"},
    },
}


def torchrun_cmd(root, config_path):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={WORLD}",
        "-m",
        "tasks.distributed_synthesis",
        str(root),
        "--config",
        str(config_path),
    ]


def env(threads=1):
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def run_torchrun(root, config_path, threads=1):
    done = subprocess.run(
        torchrun_cmd(root, config_path), cwd=REPO, env=env(threads), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]


def images(root):
    return read_images(RunFS(root), SYN_IMAGES)[0]


def _prepare(base, name, config):
    """A run with teachers and statistics, and its config file."""
    config_path = base / f"{name}.json"
    config_path.write_text(json.dumps(config))
    prepared = base / f"prepared-{name}"
    with open_run(prepared, parse_config(config)) as run:
        STAGES["data"](run)
        STAGES["teachers"](run)
        STAGES["stats"](run)
    return prepared, config_path


def _copy(prepared, root):
    shutil.copytree(prepared, root)
    return root


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory):
    """float32 and float64 runs with teachers and statistics; the single-process synthesis of
    each (1 thread), and the uninterrupted 2-rank float32 synthesis (1 thread per rank)."""
    base = tmp_path_factory.mktemp("dist")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prepared, config_path = _prepare(base, "f32", STAGE_CONFIG)
        prepared64, config64 = _prepare(base, "f64", STAGE_CONFIG_F64)
        single, single64 = _copy(prepared, base / "single"), _copy(prepared64, base / "single64")
        with open_run(single, parse_config(STAGE_CONFIG)) as run:
            STAGES["synthesis"](run)
        with open_run(single64, parse_config(STAGE_CONFIG_F64)) as run:
            STAGES["synthesis"](run)
    finally:
        torch.set_num_threads(before)
    multi = _copy(prepared, base / "multi")
    t0 = time.time()
    run_torchrun(multi, config_path)
    print(f"2-rank synthesis stage (torchrun, gloo): {time.time() - t0:.1f} s")
    return {
        "config": config_path,
        "config64": config64,
        "prepared": prepared,
        "prepared64": prepared64,
        "single": single,
        "single64": single64,
        "multi": multi,
    }


def _records(root):
    return [json.loads((root / syn_commit(b)).read_text()) for b in (1, 2)]


# Slow tier: the default tier's float64 torchrun stage is test_the_flow_launches_the_two_rank_job.
@pytest.mark.slow
@pytest.mark.parametrize("rank_threads", THREADS, ids=lambda n: f"threads{n}")
def test_two_rank_float64_stage_equals_single_process_stage(stage_runs, tmp_path, rank_threads):
    """The stage through torchrun in float64 writes the single process's images (stored as
    float32: to float32 rounding) and loss curves (to float64 rounding)."""
    multi = _copy(stage_runs["prepared64"], tmp_path / "multi64")
    run_torchrun(multi, stage_runs["config64"], rank_threads)
    got, ref = images(multi), images(stage_runs["single64"])
    diff = float((got - ref).abs().max())
    print(f"float64 stage, {rank_threads} threads per rank: images max |difference| {diff:.1e}")
    assert got.shape == ref.shape and rel(got, ref) < 1e-6 and diff < 1e-5
    for rec, ref_rec in zip(_records(multi), _records(stage_runs["single64"]), strict=True):
        assert len(rec["loss_curve"]) == len(ref_rec["loss_curve"]) == ITERATIONS
        for a, b in zip(rec["loss_curve"], ref_rec["loss_curve"], strict=True):
            assert abs(a / b - 1) < TRAJECTORY_F64_REL


def test_two_rank_float32_stage_agrees_with_single_process_stage(stage_runs):
    """float32: the same first loss (the same initial images) and loss curves within
    CURVE_F32_REL; rank 0 wrote what a single process writes, and no checkpoint is left."""
    multi, single = images(stage_runs["multi"]), images(stage_runs["single"])
    assert multi.shape == single.shape and bool(torch.isfinite(multi).all())
    recs, refs = _records(stage_runs["multi"]), _records(stage_runs["single"])
    for rec, ref in zip(recs, refs, strict=True):
        assert len(rec["loss_curve"]) == len(ref["loss_curve"]) == ITERATIONS
        pairs = zip(rec["loss_curve"], ref["loss_curve"], strict=True)
        worst = max(abs(a / b - 1) for a, b in pairs)
        print(f"float32 stage batch {rec['batch']}: loss curves differ by {worst:.1e}")
        assert worst < CURVE_F32_REL
    assert abs(recs[0]["loss_curve"][0] / refs[0]["loss_curve"][0] - 1) < STEP_F32_LOSS_REL
    for key in ("single", "multi"):
        assert not (stage_runs[key] / "synthesis" / "checkpoint" / "state.json").exists()
        assert Manifest(RunFS(stage_runs[key])).is_recorded(SYN_IMAGES)


@pytest.mark.slow  # the default tier's end-to-end resume proof: tests/test_resume_kill.py
def test_sigkill_of_two_rank_job_then_relaunch_resumes(stage_runs, tmp_path):
    root = tmp_path / "killed"
    shutil.copytree(stage_runs["prepared"], root)
    marker = root / "synthesis" / "checkpoint" / "state.json"
    proc = subprocess.Popen(
        torchrun_cmd(root, stage_runs["config"]),
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    landed = proc.poll() is None
    # The whole job at once, as a lost machine: torchrun starts each rank in a session of its
    # own, so its process group alone would leave the ranks running.
    job = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in job:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(job, timeout=30)
    assert landed, "the job finished before the kill"
    assert marker.exists() and not (root / syn_commit(2)).exists()
    run_torchrun(root, stage_runs["config"])
    resumed = [
        json.loads((root / syn_commit(b)).read_text())["resumed_from_iteration"] for b in (1, 2)
    ]
    assert any(it is not None and 0 < it < ITERATIONS for it in resumed), resumed
    # The same job (ranks, threads, machine) resumed from its checkpoint: the same arithmetic.
    assert torch.equal(images(root), images(stage_runs["multi"]))


def test_the_flow_launches_the_two_rank_job(stage_runs, prefect_server, tmp_path):
    """`distributed.ranks` in the config: the flow's synthesis task runs the torchrun job on
    this machine (the ranks attach to the run the task has locked). The job's ranks get
    cpu_count / ranks threads each, so the run is float64 and compared with the single process
    to float32 rounding of the stored images."""
    from flows.distill import distill

    root = _copy(stage_runs["prepared64"], tmp_path / "flow")
    cfg = parse_config({**STAGE_CONFIG_F64, "distributed": {"ranks": WORLD}})
    assert cfg.config_hash() == parse_config(STAGE_CONFIG_F64).config_hash()
    state = distill(root=str(root), config=cfg, return_state=True)
    assert state.is_completed(), state
    got, ref = images(root), images(stage_runs["single64"])
    assert rel(got, ref) < 1e-6 and float((got - ref).abs().max()) < 1e-5
    for rec, ref_rec in zip(_records(root), _records(stage_runs["single64"]), strict=True):
        assert len(rec["loss_curve"]) == len(ref_rec["loss_curve"]) == ITERATIONS
        for a, b in zip(rec["loss_curve"], ref_rec["loss_curve"], strict=True):
            assert abs(a / b - 1) < TRAJECTORY_F64_REL
    assert (root / "validation" / "summary.json").exists()
