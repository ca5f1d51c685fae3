"""Data-parallel synthesis over 2 gloo processes on CPU equals the single-process run: the
all-reduced moments and their gradients (float64, to rounding), the images after several
iterations (float32, to float tolerance), and the synthesis stage launched with torchrun,
including a SIGKILL of the whole job and a relaunch that resumes from its checkpoint."""

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

from d3s_core import synthesis
from d3s_core.distributed import World, gather_rows, label_loss_across, moments_across
from d3s_core.isu import RunningStats
from d3s_core.loss import label_loss
from d3s_core.stats import _Moments
from d3s_core.synthesis import (
    finish_batch,
    gather_state,
    init_state,
    run_iterations,
)
from storage.arrays import read_images
from storage.config import parse_config
from storage.fs import RunFS
from storage.manifest import Manifest
from storage.run import SYN_IMAGES, open_run, syn_commit
from tasks.stages import STAGES

from .test_flow import prefect_server  # noqa: F401, E402
from .test_storage_safety import SMALL
from .test_synthesis import CFG, measured

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
# float64 moments, loss and gradients: the largest differences measured are printed (-s).
# float32 images: Adam moves a pixel by ~lr whatever the size of its gradient, so pixels whose
# gradient is rounding noise differ between any two float32 runs, and the differences grow with
# the iterations. The reference is therefore the single process with float64 statistics, and
# the bound the one the float32 single process itself meets against it (measured: docs/
# distributed.md).
F64_TOL = 1e-12
SIZE = 32
IMAGE_REL = 1e-5  # relative L2 difference of the images


def _spawn(fn, tmp_path, *args):
    """Run fn(rank, init_file, out_dir, *args) in WORLD gloo processes."""
    init = tmp_path / "store"
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    mp.start_processes(
        _worker, args=(fn, str(init), str(out), args), nprocs=WORLD, start_method="spawn"
    )
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _worker(rank, fn, init, out, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    try:
        world = World.current()
        assert world is not None and world.rank == rank
        torch.save(fn(world, *args), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


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


def test_all_reduced_moments_and_gradients_equal_single_process(tmp_path):
    x4, x2, logits, labels = _activations()
    inputs = [t.clone().requires_grad_(True) for t in (x4, x2, logits)]
    moments = [_Moments.apply(x) for x in inputs[:2]]
    ce = label_loss(inputs[2], labels)
    loss = _loss(moments, ce)
    grads = torch.autograd.grad(loss, inputs)
    loss, ce = loss.detach(), ce.detach()
    moments = [(mu.detach(), cov.detach()) for mu, cov in moments]
    # The single-process moments are themselves checked against torch.cov here.
    s = x4.permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.allclose(moments[0][1], torch.cov(s.T, correction=0), atol=F64_TOL)

    ranks = _spawn(_moments_rank, tmp_path)
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


def _two_batches(world, n):
    """Batches 1 and 2 with per-iteration teachers, exact ISU and an uneven split of n rows."""
    torch.set_num_threads(1)
    teachers = [measured_teacher(0), measured_teacher(1)]
    cfg = dataclasses.replace(CFG, iterations=8, teacher_choice="per_iteration", isu="exact")
    running = RunningStats.zeros([t.channels for t in teachers])
    out = {}
    for b in (1, 2):
        labels = torch.arange(n) % 4
        state = init_state(b, labels, (3, SIZE, SIZE), seed=7 + b, world=world)
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


def _float64_statistics(x):
    """The single-process statistics without float32 rounding (the reference's only change)."""
    return tuple(t.float() for t in _Moments.apply(x.double()))


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_synthesis_on_two_ranks_gives_the_single_process_images(tmp_path, monkeypatch):
    n = 9  # rows 0..4 on rank 0, 5..8 on rank 1
    single = _two_batches(None, n)
    monkeypatch.setattr(synthesis, "batch_moments", _float64_statistics)
    exact = _two_batches(None, n)
    ranks = _spawn(_two_batches, tmp_path, n)
    for b in (1, 2):
        got = ranks[0][b]
        for it, (x, ref, ref32) in enumerate(
            zip(got["images"], exact[b]["images"], single[b]["images"], strict=True)
        ):
            where = f"batch {b} iteration {it + 1}"
            print(
                f"{where}: 2 ranks vs float64-statistics process: rel {rel(x, ref):.1e}, max "
                f"{float((x - ref).abs().max()):.1e}; float32 process vs it: rel "
                f"{rel(ref32, ref):.1e}, max {float((ref32 - ref).abs().max()):.1e}"
            )
            # Adam's first steps move a pixel by ~lr whatever its gradient's size, so a pixel
            # whose gradient is rounding noise differs by up to lr in any two float32 runs:
            # the bound is the one the float32 single process itself meets.
            assert rel(x, ref) <= rel(ref32, ref) + IMAGE_REL, where
        v, v_ref, v32 = got["exp_avg_sq"], exact[b]["exp_avg_sq"], single[b]["exp_avg_sq"]
        assert rel(v, v_ref) <= rel(v32, v_ref) + IMAGE_REL
        assert got["teachers"] == single[b]["teachers"]
        for r in range(WORLD):  # loss history: the global values, the same on every rank
            assert torch.equal(ranks[r][b]["losses"], got["losses"])
            assert torch.allclose(ranks[r][b]["losses"], exact[b]["losses"], rtol=1e-3)
            assert torch.allclose(ranks[r][b]["layers"], exact[b]["layers"], rtol=1e-3, atol=1e-5)
        assert ranks[1][b]["images"] == [None] * len(got["images"])
    # Iteration 1 of batch 1 sees identical images: the loss agrees with the float32 process.
    assert abs(float(ranks[0][1]["losses"][0] / single[1]["losses"][0]) - 1) < 1e-5
    for m in range(2):
        for layer, cov in enumerate(exact["running_covs"][m]):
            # ISU statistics: the same on every rank, and those of the whole batch
            assert torch.equal(
                ranks[0]["running_covs"][m][layer], ranks[1]["running_covs"][m][layer]
            )
            assert rel(ranks[1]["running_covs"][m][layer], cov) < 1e-2


# Stage level: torchrun, 2 gloo ranks, the tiny SMALL run with mid-batch checkpoints.
ITERATIONS = 8
STAGE_CONFIG = {
    **SMALL,
    "name": "distributed-test",
    "synthesis": {
        "ipc": 2,
        "batch_size": 10,
        "checkpoint_every": 2,
        "params": {"iterations": ITERATIONS},
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


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_torchrun(root, config_path):
    done = subprocess.run(
        torchrun_cmd(root, config_path), cwd=REPO, env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]


def images(root):
    return read_images(RunFS(root), SYN_IMAGES)[0]


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory):
    """A run with teachers and statistics; the single-process synthesis on one copy and the
    uninterrupted 2-rank synthesis on another."""
    base = tmp_path_factory.mktemp("dist")
    torch.set_num_threads(1)
    cfg = parse_config(STAGE_CONFIG)
    config_path = base / "config.json"
    config_path.write_text(json.dumps(STAGE_CONFIG))
    prepared = base / "prepared"
    with open_run(prepared, cfg) as run:
        STAGES["teachers"](run)
        STAGES["stats"](run)
    single, exact, multi = base / "single", base / "exact", base / "multi"
    for root in (single, exact, multi):
        shutil.copytree(prepared, root)
    with open_run(single, cfg) as run:
        STAGES["synthesis"](run)
    with pytest.MonkeyPatch.context() as mp_, open_run(exact, cfg) as run:
        mp_.setattr(synthesis, "batch_moments", _float64_statistics)
        STAGES["synthesis"](run)
    t0 = time.time()
    run_torchrun(multi, config_path)
    print(f"2-rank synthesis stage (torchrun, gloo): {time.time() - t0:.1f} s")
    return {
        "config": config_path,
        "prepared": prepared,
        "single": single,
        "exact": exact,
        "multi": multi,
    }


def test_two_rank_stage_equals_single_process_stage(stage_runs):
    single, exact, multi = (images(stage_runs[k]) for k in ("single", "exact", "multi"))
    assert multi.shape == single.shape and bool(torch.isfinite(multi).all())
    for b, rows in ((1, slice(0, 10)), (2, slice(10, 20))):
        m, s, e = multi[rows], single[rows], exact[rows]
        print(
            f"stage batch {b}, relative to the float64-statistics process: 2 ranks "
            f"{rel(m, e):.1e} (max {float((m - e).abs().max()):.1e}), float32 process "
            f"{rel(s, e):.1e} (max {float((s - e).abs().max()):.1e})"
        )
        assert rel(m, e) <= rel(s, e) + IMAGE_REL
    # Rank 0 wrote what a single process writes, and no checkpoint is left behind.
    for key in ("single", "multi"):
        assert not (stage_runs[key] / "synthesis" / "checkpoint" / "state.json").exists()
        assert Manifest(RunFS(stage_runs[key])).is_recorded(SYN_IMAGES)
    for b in (1, 2):
        rec = json.loads((stage_runs["multi"] / syn_commit(b)).read_text())
        ref = json.loads((stage_runs["exact"] / syn_commit(b)).read_text())
        assert len(rec["loss_curve"]) == len(ref["loss_curve"]) == ITERATIONS
        assert abs(rec["final_loss"] / ref["final_loss"] - 1) < 2e-2
        if b == 1:  # the same initial images: the same loss to float32 rounding
            assert abs(rec["loss_curve"][0] / ref["loss_curve"][0] - 1) < 1e-6


def test_sigkill_of_two_rank_job_then_relaunch_resumes(stage_runs, tmp_path):
    root = tmp_path / "killed"
    shutil.copytree(stage_runs["prepared"], root)
    marker = root / "synthesis" / "checkpoint" / "state.json"
    proc = subprocess.Popen(
        torchrun_cmd(root, stage_runs["config"]),
        cwd=REPO,
        env=ENV,
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
    assert torch.equal(images(root), images(stage_runs["multi"]))


def test_the_flow_launches_the_two_rank_job(stage_runs, prefect_server, tmp_path):  # noqa: F811
    """`distributed.ranks` in the config: the flow's synthesis task runs the torchrun job on
    this machine (the ranks attach to the run the task has locked); the images are those of the
    same 2-rank job launched by hand."""
    from flows.distill import distill

    root = tmp_path / "flow"
    shutil.copytree(stage_runs["prepared"], root)
    cfg = parse_config({**STAGE_CONFIG, "distributed": {"ranks": WORLD}})
    assert cfg.config_hash() == parse_config(STAGE_CONFIG).config_hash()
    state = distill(root=str(root), config=cfg, return_state=True)
    assert state.is_completed(), state
    assert torch.equal(images(root), images(stage_runs["multi"]))
    assert (root / "validation" / "summary.json").exists()
