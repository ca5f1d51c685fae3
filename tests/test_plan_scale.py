"""`d3s plan`'s peak host memory per stage against a measured run (slow: one probe run).

bench/scale_probe.py runs every stage in one process at the default-tier shape of
tests/test_scale.py (2,613 classes, here IPC 1, 8 px; DataLoader workers off) and measures each
stage's peak resident memory (VmHWM). The plan of the same config must be within 25% of it for
every stage; the baseline stage's peak is the largest of the plan's baseline_* rows. About 30 s
on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from storage.config import parse_config
from tasks import plan as P
from tasks.stage_table import by_name

from .helpers import REPO, probe

TOLERANCE = 0.25


def _scale_probe_module():
    spec = importlib.util.spec_from_file_location("scale_probe", REPO / "bench" / "scale_probe.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's VmHWM")
def test_plan_peak_host_memory_within_25_percent_of_the_probe(tmp_path, request):
    import d3s_core.presets as presets

    classes, ipc, size = 2613, 1, 8
    measured = probe(tmp_path / "run", classes, ipc, size)
    # the probe's preset (a scale-21k variant registered in its own process) here too, while
    # this test runs
    sp = _scale_probe_module()
    args = argparse.Namespace(classes=classes, ipc=ipc, size=size)
    name = sp.preset_name(args)
    if name not in presets.PRESETS:
        sp.register_preset(args)
        request.addfinalizer(lambda: presets.PRESETS.pop(name, None))
    cfg = parse_config(measured["config"])
    plan = P.make_plan(cfg)
    c, mem = plan["counts"], plan["memory"]["stages"]
    assert c["synthesis"]["batches"] == measured["stages"]["synthesis"]["units"]
    # the training images the plan counts (synthetic_size less the held-out part, per class)
    # are those of the run's profile, which the plan reads from the run's root
    run_profile = json.loads((tmp_path / "run" / "dataset" / "profile.json").read_text())
    assert plan["train_images"]["count"] == run_profile["train_images"]
    from_root = P.make_plan(cfg, root=str(tmp_path / "run"))
    assert from_root["data"]["where"].startswith("the run's ")
    assert from_root["train_images"]["count"] == run_profile["train_images"]
    assert from_root["shape"] == {**plan["shape"], "sources": from_root["shape"]["sources"]}
    lines, bad = [], []
    for stage, m in measured["stages"].items():
        if not by_name()[stage].plan:  # the planner has no model of it (the data stage)
            lines.append(f"{stage}: not estimated, measured {m['peak_rss_mib']:.0f} MiB")
            continue
        keys = [k for k in P.stages.of_run_stage(stage) if k in mem]
        assert keys, stage
        planned = max(mem[k]["host_peak"] for k in keys) / 2**20
        got = m["peak_rss_mib"]
        err = (planned - got) / got
        lines.append(f"{stage}: plan {planned:.0f} MiB, measured {got:.0f} MiB ({err:+.0%})")
        if abs(err) > TOLERANCE:
            bad.append(stage)
    print("plan vs measured peak host memory:", "; ".join(lines))
    assert not bad, f"off by more than {TOLERANCE:.0%}: {bad}: " + "; ".join(lines)
