"""Named tensors + JSON metadata, without pickle.

A state is any nested dict/list of tensors, numbers, strings and None (a model's state_dict, an
optimiser's, a synthesis batch's). Tensors go to a safetensors file named by its own checksum,
`<rel>.<sha256[:16]>.safetensors`; the structure, with each tensor replaced by a reference,
goes to `<rel>.json`, written last, which names that file and records its checksum. The JSON is
the commit marker: overwriting a state never touches the files the current marker points to,
so a kill at any moment leaves either the old state or the new one, complete and verified.
Tensors files no marker points to are deleted after the marker is written. Nothing on the load
path can run code.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import threading
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .fs import RunFS
from .manifest import CorruptArtifact


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = prefix or "value"
        out[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, str | int) for k in obj):
            raise TypeError(f"state keys must be str or int at {prefix!r}")
        return {
            "__dict__": [
                [k, _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)] for k, v in obj.items()
            ]
        }
    if isinstance(obj, list | tuple):
        items = [_flatten(v, f"{prefix}.{i}", out) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} (no pickle)")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(fs: RunFS, rel: str, state: Any, meta: dict[str, Any] | None = None) -> None:
    """Write `rel`.safetensors then `rel`.json (the commit marker)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(state, "", tensors)
    # safetensors refuses tensors that share memory; give each its own storage.
    blob = st_save({k: v.clone() for k, v in tensors.items()})
    digest = hashlib.sha256(blob).hexdigest()
    name = f"{posixpath.basename(rel)}.{digest[:16]}.safetensors"
    fs.write_bytes(posixpath.join(posixpath.dirname(rel), name), blob)
    record = {
        "structure": structure,
        "meta": meta or {},
        "tensors_file": name,
        "tensors_sha256": digest,
    }
    fs.write_bytes(f"{rel}.json", json.dumps(record, indent=1).encode())
    _remove_tensor_files(fs, rel, keep=name)


def _remove_tensor_files(fs: RunFS, rel: str, keep: str | None = None) -> None:
    directory, base = posixpath.dirname(rel), posixpath.basename(rel)
    for f in fs.listdir(directory):
        if f.startswith(base + ".") and f.endswith(".safetensors") and f != keep:
            fs.remove(posixpath.join(directory, f))


def weights_blob(state_dict: dict[str, torch.Tensor]) -> bytes:
    """A model's state_dict as safetensors bytes (each tensor with its own storage)."""
    return st_save({k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()})


def has_state(fs: RunFS, rel: str) -> bool:
    return fs.exists(f"{rel}.json")


def load_state(fs: RunFS, rel: str) -> tuple[Any, dict[str, Any]]:
    """Read a state written by `save_state`; raises CorruptArtifact naming the file if the
    marker is not a state's, its tensors file is gone, or the tensors do not match the checksum
    in the marker."""
    marker = fs.url(rel + ".json")
    try:
        record = json.loads(fs.read_bytes(f"{rel}.json"))
        path = posixpath.join(posixpath.dirname(rel), record["tensors_file"])
        structure, checksum, meta = record["structure"], record["tensors_sha256"], record["meta"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptArtifact(f"{marker}: not a state's marker ({type(e).__name__}: {e})") from None
    try:
        blob = fs.read_bytes(path)
    except FileNotFoundError:
        raise CorruptArtifact(f"{fs.url(path)}: missing (named by {marker})") from None
    if hashlib.sha256(blob).hexdigest() != checksum:
        raise CorruptArtifact(f"{fs.url(path)}: checksum mismatch")
    tensors = st_load(blob)
    return _unflatten(structure, tensors), meta


def resume_state(fs: RunFS, rel: str, warn: Callable[[str], None]) -> tuple[Any, dict] | None:
    """A checkpoint to resume from, or None where there is none, or where it is damaged: a
    checkpoint is only a shortcut, so a damaged one is removed (with a warning naming it) and
    its unit of work (a teacher, a student, a synthesis batch) starts again from the top."""
    if not has_state(fs, rel):
        return None
    try:
        return load_state(fs, rel)
    except CorruptArtifact as e:
        warn(f"{e}: a damaged checkpoint, removed; its work starts again from the top")
        remove_state(fs, rel)
        return None


def state_meta(fs: RunFS, rel: str) -> dict[str, Any]:
    """The JSON metadata of a state, from its marker alone (the tensors file is not read: a
    synthesis checkpoint is 345 MiB at 224 px)."""
    try:
        return dict(json.loads(fs.read_bytes(f"{rel}.json"))["meta"])
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptArtifact(f"{fs.url(rel + '.json')}: not a state's marker ({e})") from None


def remove_state(fs: RunFS, rel: str) -> None:
    fs.remove(f"{rel}.json")  # marker first: a half-removed state reads as absent
    _remove_tensor_files(fs, rel)


class BackgroundSaver:
    """`save_state` on a background thread, so a long loop does not wait for hashing and
    writing a checkpoint (about 345 MiB per synthesis batch at 224 px).

    `save` takes a snapshot of the state's tensors and returns: on CUDA a non-blocking copy into
    pinned host buffers (reused from one save to the next), ordered on the current stream
    before any later in-place update of the originals; on the CPU a copy. The thread waits for
    the copy, then writes exactly as `save_state` does (tensors file, then the JSON commit
    marker), so a kill at any moment leaves the previous state or the new one. One save is in
    flight at a time: the next `save` (and `wait`) first waits for it, so host memory holds at
    most one snapshot. `wait` re-raises a failed write's error in the caller; call it before
    anything that must follow the checkpoint on disk (a batch's commit, removing the state).
    """

    def __init__(self, fs: RunFS) -> None:
        self.fs = fs
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pinned: dict[str, torch.Tensor] = {}

    def _snapshot(self, obj: Any, prefix: str = "") -> Any:
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            if t.device.type != "cuda":
                return t.to("cpu", copy=True)
            buf = self._pinned.get(prefix)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                self._pinned[prefix] = buf
            return buf.copy_(t, non_blocking=True)
        if isinstance(obj, dict):
            return {k: self._snapshot(v, f"{prefix}.{k}") for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            items = [self._snapshot(v, f"{prefix}.{i}") for i, v in enumerate(obj)]
            return tuple(items) if isinstance(obj, tuple) else items
        return obj

    def save(self, rel: str, state: Any, meta: dict[str, Any] | None = None) -> None:
        self.wait()
        snapshot = self._snapshot(state)
        event = None
        if torch.cuda.is_available() and self._pinned:
            event = torch.cuda.Event()
            event.record()

        def write() -> None:
            try:
                if event is not None:
                    event.synchronize()
                save_state(self.fs, rel, snapshot, meta)
            except BaseException as e:  # re-raised by wait() in the caller's thread
                self._error = e

        self._thread = threading.Thread(target=write, name=f"save {rel}", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        """Block until the save in flight is on disk; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> BackgroundSaver:
        return self

    def __exit__(self, *exc: object) -> None:
        """Let the save in flight finish (it is a valid checkpoint); an error of its own is
        raised only if nothing else is being raised."""
        if exc[0] is None:
            self.wait()
        else:
            try:
                self.wait()
            except BaseException:
                pass
