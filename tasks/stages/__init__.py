"""Stage runners: plain Python, one module per stage. Each is idempotent (a finished artifact
is verified and kept), resumes from its last checkpoint, and writes atomically. Prefect tasks
wrap them (tasks/)."""

from .baseline import baseline_real
from .labels import label_run
from .stats import compute_stats
from .synthesis import synthesize
from .teachers import train_teachers
from .validation import validate

STAGES = {
    "teachers": train_teachers,
    "stats": compute_stats,
    "synthesis": synthesize,
    "labels": label_run,
    "validation": validate,
}

# Optional stages, run when the config asks for them.
EXTRA_STAGES = {"baseline": baseline_real}

__all__ = [
    "EXTRA_STAGES",
    "baseline_real",
    "STAGES",
    "compute_stats",
    "label_run",
    "synthesize",
    "train_teachers",
    "validate",
]
