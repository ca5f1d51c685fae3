"""Stage runners: plain Python, one module per stage. Each is idempotent (a finished artifact
is verified and kept), resumes from its last checkpoint, and writes atomically. Prefect tasks
wrap them (tasks/)."""

from .baseline import baseline_coresets, baseline_real, full_data_reference
from .labels import label_run
from .stats import compute_stats
from .synthesis import synthesize
from .teachers import train_teachers
from .validation import validate, validate_hard

STAGES = {
    "teachers": train_teachers,
    "stats": compute_stats,
    "synthesis": synthesize,
    "labels": label_run,
    "validation": validate,
}

# Optional stages, run when the config asks for them: the hard protocol on the distilled set
# (validation.protocols), the baselines (validation.random_real_baseline, .coresets,
# .full_data).
EXTRA_STAGES = {
    "validation-hard": validate_hard,
    "baseline": baseline_real,
    "coresets": baseline_coresets,
    "full-data": full_data_reference,
}

__all__ = [
    "EXTRA_STAGES",
    "baseline_coresets",
    "baseline_real",
    "full_data_reference",
    "STAGES",
    "compute_stats",
    "label_run",
    "synthesize",
    "train_teachers",
    "validate",
    "validate_hard",
]
