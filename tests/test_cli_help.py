"""`d3s --help` imports nothing heavy, and every argument of every subcommand is explained."""

import argparse
import subprocess
import sys
from pathlib import Path

from flows.cli import build_parser
from tasks.stage_table import stages

STAGE_NAMES = [s.name for s in stages()]

REPO = Path(__file__).resolve().parents[1]
# Importing any of these costs seconds (torch alone ~10 s on a busy machine); --help must not.
HEAVY = ("torch", "prefect", "zarr", "numpy", "d3s_core", "tasks.stages", "storage.config")


def _subparsers(ap: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_help_imports_nothing_heavy():
    commands = [[]] + [[name] for name in _subparsers(build_parser())]
    code = (
        "import sys, flows.cli as c\n"
        f"for argv in {commands!r}:\n"
        "    try:\n"
        "        c.main(argv + ['--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (argv, e.code)\n"
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert "usage: d3s run" in out and "usage: d3s validation" in out
    assert out.splitlines()[-1] == "HEAVY []"


def test_every_argument_has_help():
    subs = _subparsers(build_parser())
    assert set(STAGE_NAMES) < set(subs)
    assert {"run", "status", "verify", "repair", "study", "plan"} < set(subs)
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert all(c.help for c in action._choices_actions), "a subcommand without help"
    for name, sp in subs.items():
        for a in sp._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help and a.help.strip(), f"d3s {name}: {a.dest} has no help"


def test_config_help_names_the_docs():
    subs = _subparsers(build_parser())
    for name in ("run", "plan", *STAGE_NAMES):
        (config,) = [a for a in subs[name]._actions if a.dest == "config"]
        assert "docs/datasets.md" in config.help and "configs/demo-mnist.json" in config.help
    assert (REPO / "docs/datasets.md").exists() and (REPO / "configs/demo-mnist.json").exists()


def test_stage_names_match_the_stages():
    from tasks.stages import EXTRA_STAGES, STAGES

    assert STAGE_NAMES == [*STAGES, *EXTRA_STAGES]
