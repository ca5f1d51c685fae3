"""Bad input gets a clear error naming the file, folder or value, and writes no artifact;
teachers import from torchvision/timm-style state dicts and safetensors, never running code."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from d3s_core.models import build_model
from storage.checkpoints import load_into, read_state_dict
from storage.imagefolder import ImageFolderDataset

from .helpers import folder_config, make_tree, run_teachers


def artifacts(root):
    return (
        sorted(p.name for p in (root / "teachers").rglob("*"))
        if (root / "teachers").exists()
        else []
    )


def test_imagefolder_trains_teachers_from_a_streamed_tree(tmp_path):
    train, val = make_tree(tmp_path / "train"), make_tree(tmp_path / "val", per_class=1)
    run_teachers(tmp_path / "run", folder_config(train, val))
    assert "teacher_0.safetensors" in artifacts(tmp_path / "run")


def test_missing_dataset_path(tmp_path):
    cfg = folder_config(tmp_path / "nope", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        run_teachers(tmp_path / "run", cfg)
    assert artifacts(tmp_path / "run") == []


def test_empty_class_folder(tmp_path):
    train = make_tree(tmp_path / "train")
    (train / "class_99").mkdir()
    with pytest.raises(ValueError, match="class_99.*no image files"):
        ImageFolderDataset(train, 28, 1, (0.5,), (0.5,))


def test_unreadable_image_is_named_and_nothing_is_written(tmp_path):
    train, val = make_tree(tmp_path / "train"), make_tree(tmp_path / "val", per_class=1)
    (train / "class_03" / "1.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"class_03/1\.png: unreadable image"):
        run_teachers(tmp_path / "run", folder_config(train, val))
    assert artifacts(tmp_path / "run") == []


def test_wrong_mode_and_size(tmp_path):
    train = make_tree(tmp_path / "train", mode="RGB")
    ds = ImageFolderDataset(train, 28, 1, (0.5,), (0.5,))
    with pytest.raises(
        ValueError, match=r"0\.png: image mode 'RGB' is a colour image.*dataset\.channels: 3"
    ):
        ds[0]
    Image.fromarray(np.zeros((4, 4), np.uint8), "L").save(train / "class_00" / "0.png")
    with pytest.raises(ValueError, match=r"0\.png: image is 4x4 px"):
        ImageFolderDataset(train, 28, 3, (0.5,) * 3, (0.5,) * 3)[0]


def test_classes_that_do_not_match(tmp_path):
    train, val = make_tree(tmp_path / "train", classes=9), make_tree(tmp_path / "val", per_class=1)
    with pytest.raises(ValueError, match="9 class folders, but dataset.num_classes is 10"):
        run_teachers(tmp_path / "run", folder_config(train, val, {"num_classes": 10}))
    with pytest.raises(ValueError, match=r"val: class folders differ.*unexpected \['class_09'\]"):
        run_teachers(tmp_path / "run1", folder_config(train, val))
    train2 = make_tree(tmp_path / "train2")
    (val / "class_05").rename(val / "class_x")
    with pytest.raises(ValueError, match="class folders differ"):
        run_teachers(tmp_path / "run2", folder_config(train2, val))


def test_import_teachers_from_pth_and_safetensors(tmp_path):
    train, val = make_tree(tmp_path / "train"), make_tree(tmp_path / "val", per_class=1)
    model = build_model("small_resnet", 10, in_chans=1, low_res=True, width=16)
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
        tmp_path / "t.pth",
    )
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "t.safetensors"
    )
    for name in ("t.pth", "t.safetensors"):
        sd = read_state_dict(str(tmp_path / name))
        assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    cfg = folder_config(
        train, val, count=2, import_from=[str(tmp_path / "t.pth"), str(tmp_path / "t.safetensors")]
    )
    run_teachers(tmp_path / "run", cfg)
    assert "teacher_1.safetensors" in artifacts(tmp_path / "run")
    # A checkpoint for another class count is refused, naming the file ...
    other = build_model("small_resnet", 7, in_chans=1, low_res=True, width=16)
    save_file(other.state_dict(), tmp_path / "seven.safetensors")
    with pytest.raises(ValueError, match=r"seven\.safetensors: fc\.(weight|bias) has shape"):
        load_into(model, read_state_dict(str(tmp_path / "seven.safetensors")), "seven.safetensors")
    # ... unless it is a starting point, where the classifier is re-initialised.
    assert load_into(
        model, read_state_dict(str(tmp_path / "seven.safetensors")), "x", allow_new_head=True
    ) == ["fc.bias", "fc.weight"]


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['D3S_PWNED']}",))


def test_a_checkpoint_cannot_run_code(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("D3S_PWNED", str(marker))
    torch.save({"fc.weight": torch.zeros(1), "payload": Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="evil.pth: not a weights-only"):
        read_state_dict(str(tmp_path / "evil.pth"))
    assert not marker.exists()
