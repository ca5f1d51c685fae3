"""Stage tasks retry transient I/O failures only; a retried stage completes, anything else
fails at once."""

import errno

import pytest

from storage.config import parse_config
from storage.manifest import CorruptArtifact
from storage.run import open_run
from tasks.retry import is_transient_io
from tasks.stages import STAGES

from .configs import SMALL


class EndpointConnectionError(Exception):  # botocore's name; matched by name
    pass


def chained(outer: Exception, inner: Exception) -> Exception:
    try:
        try:
            raise inner
        except Exception as e:
            raise outer from e
    except Exception as e:
        return e


@pytest.mark.parametrize(
    "exc, transient",
    [
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (OSError(errno.ETIMEDOUT, "timed out"), True),
        (EndpointConnectionError("s3"), True),
        (chained(RuntimeError("write failed"), ConnectionResetError()), True),
        (FileNotFoundError("x"), False),
        (PermissionError("x"), False),
        (OSError(errno.ENOSPC, "disk full"), False),
        (CorruptArtifact("x: checksum mismatch"), False),
        (ValueError("bad config"), False),
        (RuntimeError("CUDA out of memory"), False),
        (chained(CorruptArtifact("damaged"), ConnectionResetError()), False),
    ],
)
def test_what_is_transient(exc, transient):
    assert is_transient_io(exc) is transient


def _flow_with(stage_task, root, cfg):
    from prefect import flow

    @flow
    def one_stage():
        with open_run(root, cfg) as run:
            STAGES["data"](run)
            return stage_task.with_options(retry_delay_seconds=0)(
                root, cfg.model_dump(mode="json"), return_state=True
            )

    return one_stage()


def test_a_transient_failure_is_retried_and_the_stage_completes(
    prefect_server,
    tmp_path,
    monkeypatch,
):
    import tasks.stages.teachers
    from tasks.prefect_tasks import stage_task

    real, calls = STAGES["teachers"], []

    def flaky(run, progress=None):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionResetError(errno.ECONNRESET, "connection reset by peer")
        return real(run, progress)

    monkeypatch.setattr(tasks.stages.teachers, "train_teachers", flaky)
    cfg = parse_config({**SMALL, "name": "retry"})
    state = _flow_with(stage_task("teachers"), str(tmp_path / "run"), cfg)
    assert state.is_completed() and len(calls) == 2
    assert (tmp_path / "run" / "teachers" / "teacher_1.safetensors").exists()


def test_a_bug_is_not_retried(prefect_server, tmp_path, monkeypatch):
    import tasks.stages.teachers
    from tasks.prefect_tasks import stage_task

    calls = []

    def broken(run, progress=None):
        calls.append(1)
        raise ValueError("bad data")

    monkeypatch.setattr(tasks.stages.teachers, "train_teachers", broken)
    cfg = parse_config({**SMALL, "name": "noretry"})
    with pytest.raises(ValueError, match="bad data"):
        _flow_with(stage_task("teachers"), str(tmp_path / "run"), cfg)
    assert len(calls) == 1
