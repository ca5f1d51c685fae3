"""The ridge Eq. 1 actually put on a synthetic-batch covariance, where the configured one did not
make it positive definite: returned by `kl_layers`, collected per batch by the synthesis loop
(`RidgeLog`), kept across a resume in the checkpoint's metadata, written to the batch's commit
record and shown in the report."""

import json
import threading

import pytest
import torch

import d3s_core.synthesis as synthesis_mod
import tasks.stages.synthesis as syn
from d3s_core.isu import RunningStats
from d3s_core.loss import cholesky_with_ridge, kl_layers, kl_layers_unchecked, prepare_target
from d3s_core.synthesis import RidgeLog, run_iterations
from reporting.report import batch_records, batches_markdown, ridge_cell, ridge_summary
from storage.run import open_run, syn_commit

from .helpers import CFG, fresh_state, measured, streaming_config

RIDGE = 1e-4
MARGIN = 5e-4  # the shifted covariance's smallest eigenvalue is -MARGIN: fails at 1e-4


def _spd(dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, 2 * dim, generator=g, dtype=torch.float64)
    return a @ a.T / (2 * dim) + 0.1 * torch.eye(dim, dtype=torch.float64)


def indefinite(cov: torch.Tensor) -> torch.Tensor:
    """cov shifted so its smallest eigenvalue is -MARGIN: cov + 1e-4*I is not positive
    definite, cov + 1e-3*I is. Differentiable in cov (the shift is a constant)."""
    sym = 0.5 * (cov + cov.T).detach().double()
    low = torch.linalg.eigvalsh(sym)[0]
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    return cov - (low + MARGIN).to(cov.dtype) * eye


def _sym(cov: torch.Tensor) -> torch.Tensor:
    c = cov.detach().double()
    return 0.5 * (c + c.T)


def test_kl_layers_returns_the_escalated_ridge_per_layer():
    # Layers 0 and 2 are 4 wide (one group), layer 1 is 3 wide: only group 0 escalates.
    dims = (4, 3, 4)
    targets = [
        prepare_target(torch.zeros(d, dtype=torch.float64), _spd(d, i)) for i, d in enumerate(dims)
    ]
    means = [0.1 * torch.ones(d, dtype=torch.float64) for d in dims]
    covs = [_spd(d, 10 + i) for i, d in enumerate(dims)]
    covs[0] = indefinite(covs[0])
    plain = kl_layers(means, covs, targets, RIDGE)
    used: list[float] = [123.0]  # replaced, not appended to
    kl = kl_layers(means, covs, targets, RIDGE, ridges_used=used)
    assert torch.equal(kl, plain)  # what it returns is unchanged
    expected = cholesky_with_ridge(_sym(covs[0]), RIDGE)[1]
    assert expected > RIDGE
    assert cholesky_with_ridge(torch.stack([_sym(covs[0]), _sym(covs[2])]), RIDGE)[1] == expected
    assert used == [expected, RIDGE, expected]  # layer 2 shares layer 0's batched Cholesky
    # The KL of the escalated group is the one at the escalated ridge.
    at = kl_layers(means, covs, targets, expected)
    assert torch.allclose(kl[[0, 2]], at[[0, 2]], rtol=0, atol=1e-12)
    # The unchecked path does not escalate: it flags the failure for the caller to redo.
    _, failed = kl_layers_unchecked(means, covs, targets, RIDGE)
    assert bool(failed)
    # Without `ridge`, the target's ridge is the configured one.
    used_default: list[float] = []
    kl_layers(means, covs, targets, ridges_used=used_default)
    assert used_default == [expected, targets[1].ridge, expected]


def test_a_positive_definite_batch_uses_the_configured_ridge():
    dims = (4, 3)
    targets = [
        prepare_target(torch.zeros(d, dtype=torch.float64), _spd(d, i)) for i, d in enumerate(dims)
    ]
    used: list[float] = []
    kl_layers(
        [torch.zeros(d) for d in dims],
        [_spd(d, 5 + i) for i, d in enumerate(dims)],
        targets,
        RIDGE,
        ridges_used=used,
    )
    assert used == [RIDGE, RIDGE]


def shifted_kl(monkeypatch, seen: list[float], when=lambda: True):
    """Make layer 0's (ISU-mixed) batch covariance indefinite at the configured ridge in the
    synthesis loss, checked and unchecked, while `when()`; `seen` gets the ridge
    `cholesky_with_ridge` gives each checked step's shifted covariance."""
    checked, unchecked = synthesis_mod.kl_layers, synthesis_mod.kl_layers_unchecked

    def shift(covs, ridge, record):
        if not when():
            return covs
        covs = [indefinite(covs[0]), *covs[1:]]
        if record:
            seen.append(cholesky_with_ridge(_sym(covs[0]), ridge)[1])
        return covs

    def kl(means, covs, targets, ridge=None, **kw):
        return checked(means, shift(covs, ridge, True), targets, ridge, **kw)

    def kl_unchecked(means, covs, targets, ridge=None):
        return unchecked(means, shift(covs, ridge, False), targets, ridge)

    monkeypatch.setattr(synthesis_mod, "kl_layers", kl)
    monkeypatch.setattr(synthesis_mod, "kl_layers_unchecked", kl_unchecked)


def group_of_layer0(teacher) -> set[str]:
    """Layer names sharing layer 0's batched Cholesky (and so its ridge)."""
    (group,) = [g for g in teacher.target_groups if 0 in g.index]
    return {teacher.layers[i] for i in group.index}


def test_the_loop_records_the_escalated_ridge(monkeypatch):
    teachers = [measured(0)]
    running = RunningStats.zeros([t.channels for t in teachers])
    # Control: the tiny teacher's real batch covariances need nothing above the configured.
    _, hist = run_iterations(fresh_state(), teachers, running, CFG, until=3)
    log = RidgeLog.start(CFG, teachers)
    log.add(hist, teachers)
    assert all(h.ridges is None for h in hist)  # unchecked steps: no host value to record
    assert log.as_dict() == {
        "configured": CFG.ridge,
        "max_used": CFG.ridge,
        "escalated_layers": {},
        "escalated_steps": 0,
        "escalated_targets": {},
    }
    seen: list[float] = []
    shifted_kl(monkeypatch, seen)
    _, hist = run_iterations(fresh_state(), teachers, running, CFG, until=3)
    assert len(seen) == 3  # the interval failed unchecked and was redone checked
    log = RidgeLog.start(CFG, teachers)
    log.add(hist, teachers)
    assert log.escalated_steps == 3
    assert log.max_used == max(seen) > CFG.ridge
    assert set(log.escalated_layers) == {f"0/{n}" for n in group_of_layer0(teachers[0])}
    assert log.escalated_layers[f"0/{teachers[0].layers[0]}"] == max(seen)
    for h, r in zip(hist, seen, strict=True):
        assert h.ridges is not None and h.ridges[0] == r
    assert RidgeLog.from_dict(json.loads(json.dumps(log.as_dict()))) == log


def test_targets_that_needed_a_larger_ridge_are_noted():
    teacher = measured(0)
    cov = teacher.targets[1].cov
    shifted = prepare_target(teacher.targets[1].mean, indefinite(cov), RIDGE)
    assert shifted.ridge == cholesky_with_ridge(_sym(indefinite(cov)), RIDGE)[1] > RIDGE
    teacher.targets = [teacher.targets[0], shifted, *teacher.targets[2:]]
    log = RidgeLog.start(CFG, [teacher])
    assert log.escalated_targets == {f"0/{teacher.layers[1]}": shifted.ridge}
    assert log.max_used == CFG.ridge  # the batch side is what max_used reports


def test_commit_records_carry_the_ridge_across_a_resume(streaming_root, monkeypatch):
    """Batch 2 of 3 has layer 0 indefinite at the configured ridge in all 4 iterations and is
    killed after 2 (checkpointed); its record counts all 4 escalated steps."""
    torch.set_num_threads(1)
    current = {"batch": 0, "calls": 0}
    real_iterations = syn.run_iterations
    names: dict[str, set[str]] = {}

    def iterations(state, teachers, *a, **k):
        current["batch"] = state.batch_index
        names["group"] = group_of_layer0(teachers[0])
        if state.batch_index == 2:
            current["calls"] += 1
            if current["calls"] == 3:
                raise RuntimeError("kill")
        return real_iterations(state, teachers, *a, **k)

    seen: list[float] = []
    shifted_kl(monkeypatch, seen, when=lambda: current["batch"] == 2)
    monkeypatch.setattr(syn, "run_iterations", iterations)
    with (
        open_run(streaming_root, streaming_config()) as run,
        pytest.raises(RuntimeError, match="kill"),
    ):
        syn.synthesize(run)
    for t in threading.enumerate():  # the checkpoint write in flight at the kill finishes
        if t.name.startswith("save "):
            t.join()
    assert len(seen) == 2
    with open_run(streaming_root, streaming_config()) as run:
        syn.synthesize(run)
    assert len(seen) == 4
    records = {b: json.loads((streaming_root / syn_commit(b)).read_text()) for b in (1, 2, 3)}
    assert records[2]["resumed_from_iteration"] == 2
    ridge = records[2]["ridge"]
    configured = streaming_config().synthesis_cfg().ridge
    assert ridge["configured"] == configured
    assert ridge["escalated_steps"] == 4  # 2 before the kill (from the checkpoint) + 2 after
    assert ridge["max_used"] == max(seen) > configured
    assert set(ridge["escalated_layers"]) == {f"0/{n}" for n in names["group"]}
    for b in (1, 3):
        assert records[b]["ridge"] == {
            "configured": configured,
            "max_used": configured,
            "escalated_layers": {},
            "escalated_steps": 0,
            "escalated_targets": {},
        }
    # The report: a column per shown batch and the one-line summary.
    batches = batch_records(run.fs)
    md = "\n".join(batches_markdown(batches))
    assert "| ridge used |" in md
    assert "Ridge: 1 of 3 batches needed a larger ridge" in md
    assert "batches 2)" in md
    assert f"**{max(seen):.3g}** (configured {configured:.3g}; 4 steps)" in md
    assert f"| {configured:.3g} |" in md


def test_report_reads_records_without_the_ridge():
    old = {
        "batch": 1,
        "teacher": 0,
        "count": 10,
        "final_loss": 1.5,
        "resumed_from_iteration": None,
        "loss_curve": [2.0, 1.5],
    }
    new = {
        **old,
        "batch": 2,
        "ridge": {
            "configured": 1e-4,
            "max_used": 1e-3,
            "escalated_layers": {"0/layer1": 1e-3},
            "escalated_steps": 1,
            "escalated_targets": {"1/stem": 1e-2},
        },
    }
    assert ridge_cell(old) == "—"
    assert ridge_cell(new) == "**0.001** (configured 0.0001; 1 step)"
    assert ridge_cell(new, bold=False) == "0.001 (configured 0.0001; 1 step)"
    md = batches_markdown([old, new])
    assert any(line.startswith("| 1 |") and line.endswith("| — |") for line in md)
    assert ridge_summary([old]).startswith("Ridge: not recorded")
    summary = ridge_summary([old, new])
    assert summary.startswith("Ridge: 1 of 1 batches needed a larger ridge")
    assert "1 batches committed before it was recorded" in summary
    assert "1/stem 0.01" in summary
