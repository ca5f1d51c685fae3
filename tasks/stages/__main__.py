"""Run one stage (or all, in order) from the command line, without Prefect:

python -m tasks.stages ROOT --config run.json [--stage synthesis]
"""

from __future__ import annotations

import argparse
import json
import sys

from storage.config import parse_config
from storage.run import open_run

from . import STAGES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tasks.stages", description=__doc__)
    ap.add_argument("root", help="run root: a local path or fsspec URL")
    ap.add_argument("--config", required=True, help="JSON config file")
    ap.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    args = ap.parse_args(argv)
    with open(args.config) as f:
        cfg = parse_config(json.load(f), args.config)
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    with open_run(args.root, cfg) as run:
        from .profile import data_profile, provenance_lines

        for line in provenance_lines(run):
            print(f"data: {line}", flush=True)
        for w in data_profile(run).get("warnings", []):
            print(f"warning: {w}", flush=True)
        for name in stages:
            print(f"{name}: {STAGES[name](run)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
