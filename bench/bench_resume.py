"""Seconds from opening a run to the first new synthesis iteration, with many batches done.

Takes a finished synthesis (e.g. bench/scale_probe.py's ImageNet-21K-shaped root, 523
batches), forgets the batches after --keep (their commit records and ISU states, and the
finished store's manifest entry: what `d3s repair` does), and times `synthesize` from its call
to its first `run_iterations` call. By default as after a crash: the ISU state after batch
--keep is on disk (made here, before timing, by the exact rebuild). With --rebuild as after a
repair: no ISU state, rebuilt from the stored images inside the timed call.

    .venv/bin/python bench/scale_probe.py --root /tmp/scale --ipc 10   # once
    .venv/bin/python bench/bench_resume.py --root /tmp/scale --keep 500
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="a run whose synthesis finished")
    ap.add_argument("--keep", type=int, default=500)
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    import tasks.stages.synthesis as syn
    from storage.config import load_config
    from storage.fs import RunFS
    from storage.run import SYN_IMAGES, open_run, syn_commit, syn_isu
    from storage.states import has_state, remove_state

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        shutil.copytree(
            args.root, root, ignore=shutil.ignore_patterns("labels", "validation", "baselines")
        )
        fs = RunFS(root)
        cfg = load_config(fs)
        batches = sorted(fs.listdir("synthesis/batches"))
        for name in batches[args.keep :]:
            fs.remove(f"synthesis/batches/{name}")
        for b in range(args.keep, len(batches) + 1):
            if has_state(fs, syn_isu(b)):
                remove_state(fs, syn_isu(b))
        assert fs.exists(syn_commit(args.keep))
        if not args.rebuild:  # a crash: the state after the last committed batch is on disk
            with open_run(root, cfg) as run:
                teachers = [
                    syn.MeasuredTeacher(m, *syn.load_targets(run, i, cfg.synthesis_cfg().ridge, fp))
                    for i, m in enumerate(syn.load_teachers(run))
                    for fp in [syn.data_splits(run)[2]]
                ]
                channels = [t.channels for t in teachers]
                running = syn._running_after(run, args.keep, teachers, channels, None)
                syn._save_running(run, args.keep, running)
        t0 = time.perf_counter()
        first: list[float] = []
        real = syn.run_iterations

        def timed(*a, **k):
            if not first:
                first.append(time.perf_counter() - t0)
                raise KeyboardInterrupt  # measured: stop here
            return real(*a, **k)

        syn.run_iterations = timed
        with open_run(root, cfg) as run:
            run.manifest.forget(SYN_IMAGES)
            t0 = time.perf_counter()
            try:
                syn.synthesize(run)
            except KeyboardInterrupt:
                pass
        print(
            f"{args.keep} of {len(batches)} batches committed"
            + (", ISU state rebuilt from the images" if args.rebuild else "")
            + f": first new iteration after {first[0]:.2f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
