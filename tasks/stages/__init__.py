"""Stage runners: plain Python, one module per stage. Each is idempotent (a finished artifact
is verified and kept), resumes from its last checkpoint, and writes atomically. The stage table
(tasks/stage_table.py) names them; Prefect tasks wrap them (tasks/prefect_tasks.py).

`STAGES`: the paper's stages in order, name -> runner, from the table (the data stage first);
`EXTRA_STAGES`: the optional ones (the hard protocol, the baselines)."""

from tasks.stage_table import resolve, stages

from .baseline import baseline_coresets, baseline_real, full_data_reference
from .labels import label_run
from .profile import open_data
from .stats import compute_stats
from .synthesis import synthesize
from .teachers import train_teachers
from .validation import validate, validate_hard

STAGES = {s.name: resolve(s.runner) for s in stages() if not s.extra}
EXTRA_STAGES = {s.name: resolve(s.runner) for s in stages() if s.extra}

__all__ = [
    "EXTRA_STAGES",
    "STAGES",
    "baseline_coresets",
    "baseline_real",
    "compute_stats",
    "full_data_reference",
    "label_run",
    "open_data",
    "synthesize",
    "train_teachers",
    "validate",
    "validate_hard",
]
