"""Operating-system errors (issue 11, point 6): a failed write names the file, leaves the
previous version intact and no temporary behind; the command prints one line and exits 2;
written files respect the umask."""

import errno
import os
import stat

import pytest

import storage.fs
from flows.errors import guard_os_errors, os_error_line, report_os_error
from storage.config import RunConfig
from storage.fs import RunFS
from storage.run import open_run


def temporaries(root):
    return [os.path.join(d, n) for d, _, files in os.walk(root) for n in files if ".tmp-" in n]


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the umask for one test, restored after it."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def no_space_after(n):
    """A low-level write that gets `n` bytes out, then fails as a full disk does: ENOSPC,
    no file name."""

    def write_all(fd, data):
        os.write(fd, bytes(data[:n]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write_all


def test_no_space_names_the_file_and_keeps_the_previous_version(tmp_path, monkeypatch):
    fs = RunFS(tmp_path)
    fs.write_bytes("labels/part.json", b"previous version")
    monkeypatch.setattr(storage.fs, "_write_all", no_space_after(3))
    with pytest.raises(OSError) as e:
        fs.write_bytes("labels/part.json", b"new version, longer")
    assert e.value.errno == errno.ENOSPC
    assert e.value.filename == str(tmp_path / "labels" / "part.json")
    assert (tmp_path / "labels" / "part.json").read_bytes() == b"previous version"
    assert temporaries(tmp_path) == []
    assert os_error_line(e.value) == (
        f"d3s: error: No space left on device: {tmp_path}/labels/part.json (nothing "
        "half-written counts as finished; free space, then run the same command again to resume)"
    )


def test_no_space_at_fsync_too(tmp_path, monkeypatch):
    fs = RunFS(tmp_path)
    fs.write_bytes("a.json", b"old")

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match=r"No space left on device.*a\.json"):
        fs.write_bytes("a.json", b"new")
    assert (tmp_path / "a.json").read_bytes() == b"old"
    assert temporaries(tmp_path) == []


def test_no_space_in_a_library_writer(tmp_path):
    fs = RunFS(tmp_path)
    fs.write_bytes("grid.png", b"old")
    with pytest.raises(OSError) as e, fs.atomic_local_path("grid.png") as tmp:
        with open(tmp, "wb") as f:
            f.write(b"ne")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a library's write would
    assert e.value.filename == str(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes() == b"old"
    assert temporaries(tmp_path) == []


def test_a_read_only_directory_is_a_clear_error(tmp_path, monkeypatch):
    fs = RunFS(tmp_path)
    fs.write_bytes("teachers/t.json", b"old")
    target = str(tmp_path / "teachers" / "t.json")
    if os.geteuid() == 0:  # root ignores modes: refuse the temporary file as the kernel would

        def mkstemp(prefix="", dir=None, **kw):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), f"{dir}/{prefix}x1y2")

        monkeypatch.setattr(storage.fs.tempfile, "mkstemp", mkstemp)
    else:
        os.chmod(tmp_path / "teachers", 0o555)
    try:
        with pytest.raises(PermissionError) as e:
            fs.write_bytes("teachers/t.json", b"new")
    finally:
        os.chmod(tmp_path / "teachers", 0o755)
    assert e.value.filename == target  # the file, not the temporary name mkstemp tried
    assert (tmp_path / "teachers" / "t.json").read_bytes() == b"old"
    assert temporaries(tmp_path) == []
    line = os_error_line(e.value)
    assert line.startswith(f"d3s: error: Permission denied: {target} (")
    assert "may not write there" in line


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_respect_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    fs = RunFS(tmp_path)
    fs.write_bytes("a/b.json", b"x")
    with fs.atomic_local_path("a/c.parquet") as tmp:
        with open(tmp, "wb") as f:
            f.write(b"y")
    assert mode(tmp_path / "a" / "b.json") == expected
    assert mode(tmp_path / "a" / "c.parquet") == expected
    assert mode(tmp_path / "a") == 0o777 & ~mask  # directories: the default mode
    assert storage.fs.current_umask() == mask


def test_an_overwritten_file_takes_the_umask_again(tmp_path, umask):
    umask(0o077)
    RunFS(tmp_path).write_bytes("x.json", b"1")
    umask(0o002)
    RunFS(tmp_path).write_bytes("x.json", b"2")
    assert mode(tmp_path / "x.json") == 0o664


@pytest.mark.parametrize(
    "code,remedy",
    [
        (errno.ENOSPC, "free space"),
        (errno.EROFS, "read-only: remount it read-write or use another --root"),
        (errno.EACCES, "may not write there"),
        (errno.EPERM, "may not write there"),
    ],
)
def test_the_guard_prints_one_line_and_exits_2(capsys, code, remedy):
    with pytest.raises(SystemExit) as e, guard_os_errors():
        raise OSError(code, os.strerror(code), "/runs/x/config.json")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"d3s: error: {os.strerror(code)}: /runs/x/config.json (")
    assert remedy in err


def test_the_guard_passes_other_errors_and_messages_without_errno(capsys):
    with pytest.raises(ValueError), guard_os_errors():
        raise ValueError("not an OS error")
    assert report_os_error(FileNotFoundError("/data/x: no such file")) == 2
    assert capsys.readouterr().err == "d3s: error: /data/x: no such file\n"
    line = os_error_line(OSError(errno.EXDEV, os.strerror(errno.EXDEV), "/a", None, "/b"))
    assert line == f"d3s: error: {os.strerror(errno.EXDEV)}: /a -> /b"


def test_a_full_disk_when_a_run_starts(tmp_path, monkeypatch, capsys):
    """End to end: the first write of a run (config.json) fails for lack of space: one line
    naming the file, status 2, nothing left behind, and the same command then succeeds."""
    monkeypatch.setattr(storage.fs, "_write_all", no_space_after(10))
    with pytest.raises(SystemExit) as e, guard_os_errors():
        open_run(tmp_path / "run", RunConfig())
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"d3s: error: No space left on device: {tmp_path}/run/config.json (nothing half-written "
        "counts as finished; free space, then run the same command again to resume)"
    ]
    assert not (tmp_path / "run" / "config.json").exists()
    assert temporaries(tmp_path) == []
    monkeypatch.undo()
    with open_run(tmp_path / "run", RunConfig()):
        pass
    assert (tmp_path / "run" / "config.json").exists()


def test_the_cli_reports_a_full_disk_in_one_line_and_exits_2(tmp_path, monkeypatch, capsys):
    """`d3s teachers ...` on a full disk: exit status 2, one line naming the file, no
    traceback (the CLI's own handler, flows/cli.py)."""
    import json

    from flows.cli import main

    from .configs import SMALL

    config = tmp_path / "run.json"
    config.write_text(json.dumps(SMALL))
    monkeypatch.setattr(storage.fs, "_write_all", no_space_after(10))
    assert main(["teachers", str(config), "--root", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("d3s: error: No space left on device: ")
    assert f"{tmp_path}/run/" in err[0] and "Traceback" not in err[0]
    assert temporaries(tmp_path) == []
