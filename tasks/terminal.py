"""Progress bars in the terminal (tqdm on stderr), one per stage, fed by the same progress
callback the stage runners call. On by default when stderr is a terminal; D3S_PROGRESS=bar
forces them on (e.g. under `script` or CI logs), D3S_PROGRESS=off turns them off."""

from __future__ import annotations

import os
import sys
from typing import Any, NamedTuple

from tqdm import tqdm


class Count(NamedTuple):
    """A position shown to people, 1-based: "epoch 3 of 30" is the third epoch (done, or
    under way for an outer unit such as "teacher 1 of 2"); "epoch 0 of 30" is before the
    first. Every number a person reads counts this way; file names keep their own (0-based)
    numbering (labels/epoch=0, teachers/teacher_0)."""

    done: int
    total: int

    def __str__(self) -> str:
        return f"{self.done} of {self.total}"


def describe(info: dict[str, Any]) -> str:
    """Progress details as one line: "batch 2 of 523, iteration 150 of 1000, loss 41.2"."""
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()
    )


CARD_WORDS = {"iteration": "iter"}  # shorter words on a card


def card_text(info: dict[str, Any]) -> str:
    """The short form for a progress card (Prefect's v2 UI shows one line, about 46 characters
    at 1440 px): counts as "k/N" and names ("batch 523/523, iter 1000/1000", "random-real
    baseline labels, epoch 2/30"); losses and other numbers stay in the log line
    (`describe`)."""
    parts = [
        f"{CARD_WORDS.get(k, k)} {v.done}/{v.total}" if isinstance(v, Count) else f"{k} {v}"
        for k, v in info.items()
        if isinstance(v, Count | str)
    ]
    return ", ".join(parts)


def card_line(stage: str, info: dict[str, Any]) -> str:
    """A progress card's line: "synthesis: batch 3/523, iter 120/1000"; the baseline's names
    itself ("random-real baseline labels, epoch 2/30")."""
    text = card_text(info)
    named: dict[str, str | tuple[str, ...]] = {
        "baseline": "random-real",
        "coresets": ("herding", "k-center"),
        "full-data": "full",
    }
    return text if stage in named and text.startswith(named[stage]) else f"{stage}: {text}"


def bars_enabled() -> bool:
    mode = os.environ.get("D3S_PROGRESS", "auto")
    if mode in ("off", "0", "no"):
        return False
    return mode == "bar" or sys.stderr.isatty()


class TerminalProgress:
    """Stage progress callback drawing a bar per stage: percent done, then the stage's details
    (teacher/epoch/loss, batch/iteration/loss, ...)."""

    def __init__(self) -> None:
        self.bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, fraction: float, info: dict[str, Any]) -> None:
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(
                total=100,
                desc=f"{stage:<10}",
                unit="%",
                file=sys.stderr,
                dynamic_ncols=True,
                bar_format="{desc} {percentage:5.1f}%|{bar}| [{elapsed}<{remaining}]{postfix}",
            )
        bar.set_postfix_str(describe(info), refresh=False)
        bar.update(100 * fraction - bar.n)
        if fraction >= 1.0:
            self.close(stage)

    def close(self, stage: str | None = None) -> None:
        for name in [stage] if stage else list(self.bars):
            bar = self.bars.pop(name, None)
            if bar is not None:
                bar.close()
