"""Run configs shared by the test modules (plain dicts, as `parse_config` takes them)."""

# A small demo-mnist run of every stage with checkpoints all along (the SIGKILL/resume tests).
CONFIG = {
    "name": "kill-test",
    "preset": "demo-mnist",
    "dataset": {"kind": "synthetic", "synthetic_size": 160},
    "teachers": {"count": 2, "train": {"epochs": 3}, "checkpoint_every_epochs": 1},
    "stats": {"batch_size": 16, "workers": 0, "checkpoint_batches": 1},
    "synthesis": {
        "ipc": 2,
        "batch_size": 10,
        "checkpoint_every": 2,
        "checkpoint_seconds": 0,
        "params": {"iterations": 16},
    },
    "labels": {"epochs": 6, "batch_size": 10, "format": "fp16"},
    "validation": {"students": 2, "epochs": 6, "checkpoint_every_epochs": 1},
}

# CONFIG cut to the fewest teachers, iterations and epochs: the quickest whole run.
SMALL = {
    **CONFIG,
    "teachers": {"count": 2, "train": {"epochs": 1}},
    "synthesis": {
        "ipc": 1,
        "batch_size": 10,
        "checkpoint_every": 4,
        "checkpoint_seconds": 0,
        "params": {"iterations": 4},
    },
    "labels": {"epochs": 2, "batch_size": 10},
    "validation": {"students": 1, "epochs": 1},
}

# The streaming synthesis tests' run: 3 batches of 10 (10 classes, IPC 3), 4 iterations in
# intervals of 1.
SYN = {
    **CONFIG,
    "name": "syn-streaming",
    "teachers": {"count": 1, "train": {"epochs": 1}},
    "synthesis": {
        "ipc": 3,
        "batch_size": 10,
        "checkpoint_every": 1,
        "checkpoint_seconds": 0,
        "params": {"iterations": 4},
    },
}
