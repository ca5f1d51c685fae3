"""The scores table of a run or a study: every image set under every protocol, its students'
mean +- std top-1, and DD-Ranking's scores against the random real subset and the full-data
reference (d3s_core/scores.py; formulas and source in docs/study.md, "Scores")."""

from __future__ import annotations

from typing import Any

from d3s_core.scores import Spread, paired_scores
from storage.fs import RunFS
from storage.records import read_summary
from storage.run import FULL_DATA, baseline_prefix

# A run's image sets: (name in tables, prefix), in table order.
RUN_SETS = (
    ("D3S (distilled)", ""),
    ("random real", baseline_prefix("random-real")),
    ("herding coreset", baseline_prefix("herding")),
    ("k-center coreset", baseline_prefix("k-center")),
    ("full training set", FULL_DATA),
)
RANDOM, FULL = "random real", "full training set"
PROTOCOLS = ("soft", "hard")

Accs = dict[str, dict[str, list[float]]]  # set name -> protocol -> students' top-1 (seed order)


def run_accuracies(fs: RunFS) -> Accs:
    """Every validated image set of a run and protocol: its students' top-1 from the
    validation summaries on disk (a set or protocol not validated is absent)."""
    out: Accs = {}
    for name, prefix in RUN_SETS:
        for protocol in PROTOCOLS:
            summary = read_summary(fs, prefix, protocol)
            if summary is not None:
                out.setdefault(name, {})[protocol] = list(summary["top1"])
    return out


def score_rows(accs: Accs, random: str | None = RANDOM, full: str | None = FULL) -> list[dict]:
    """A row per (image set, protocol), protocols soft then hard: students n, top-1 Spread,
    and the Spreads of IOR (against `random`, same protocol), HLR and LRS (hard protocol,
    against `full`); None where a score has no reference. The random subset's own IOR is 0,
    so its LRS is the score of random selection."""
    rows = []
    for protocol in PROTOCOLS:
        rand = accs.get(random or "", {}).get(protocol)
        full_hard = accs.get(full or "", {}).get("hard") if protocol == "hard" else None
        for name, by_protocol in accs.items():
            if protocol not in by_protocol:
                continue
            a = by_protocol[protocol]
            s = paired_scores(
                a,
                None if name == full else rand,  # the random subset itself: IOR 0 by definition
                None if name == full else full_hard,
            )
            rows.append({"set": name, "protocol": protocol, "top1": Spread.of(a), **s})
    return rows


def pct(s: Spread | None, signed: bool = False) -> str:
    """'93.1 ± 0.4' in percent (percentage points for differences); '—' for none."""
    if s is None:
        return "—"
    mean = f"{100 * s.mean:+.1f}" if signed else f"{100 * s.mean:.1f}"
    return mean if s.std is None else f"{mean} ± {100 * s.std:.1f}"


def lrs_text(s: Spread | None) -> str:
    if s is None:
        return "—"
    return f"{s.mean:.3f}" if s.std is None else f"{s.mean:.3f} ± {s.std:.3f}"


def table_rows(rows: list[dict]) -> list[dict[str, Any]]:
    """The rows as the Prefect table and the report show them (strings, 1 decimal)."""
    return [
        {
            "image set": r["set"],
            "protocol": r["protocol"],
            "n": r["top1"].n,
            "top1 %": pct(r["top1"]),
            "IOR pp": pct(r["ior"], True),
            "HLR pp": pct(r["hlr"], True),
            "LRS": lrs_text(r["lrs"]),
        }
        for r in rows
    ]


def markdown_table(rows: list[dict]) -> list[str]:
    """The scores as a markdown table (lines)."""
    shown = table_rows(rows)
    if not shown:
        return []
    keys = list(shown[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in shown]
    return lines
