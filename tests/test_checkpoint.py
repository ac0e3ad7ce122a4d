import os

import pytest
import torch
from torch import nn

from d2_defects.checkpoint import CheckpointError, DefectCheckpointer


class NotAllowed:
    """An arbitrary Python object: weights_only loading must refuse it."""


def _ckpt(tmp_path):
    model = nn.Linear(3, 2)
    return model, DefectCheckpointer(model, save_dir=str(tmp_path))


def test_save_is_atomic_when_killed_mid_write(tmp_path, monkeypatch):
    model, ckpt = _ckpt(tmp_path)
    ckpt.save("model_final")
    good = (tmp_path / "model_final.pth").read_bytes()

    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed while saving")

    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_final")
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "model_final.pth").read_bytes() == good
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]

    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(torch, "save", dying_save)
        ckpt.save("model_0000009")
    monkeypatch.setattr(torch, "save", real_save)
    # last_checkpoint still names a complete file
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert not (tmp_path / "model_0000009.pth").exists()


def test_load_round_trip_and_weights_only(tmp_path):
    model, ckpt = _ckpt(tmp_path)
    ckpt.save("m", iteration=7)
    model2, ckpt2 = _ckpt(tmp_path)
    extra = ckpt2.load(str(tmp_path / "m.pth"))
    assert extra["iteration"] == 7
    torch.testing.assert_close(model2.weight, model.weight)

    torch.save({"model": model.state_dict(), "obj": NotAllowed()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=str(tmp_path / "evil.pth")):
        ckpt2.load(str(tmp_path / "evil.pth"))


def test_missing_and_corrupt(tmp_path):
    _, ckpt = _ckpt(tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        ckpt.load(str(tmp_path / "nope.pth"))
    (tmp_path / "bad.pth").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="bad.pth"):
        ckpt.load(str(tmp_path / "bad.pth"))


def test_save_dir_of_another_path_handler_is_written_through_path_manager(tmp_path):
    """Output folders on other storage (s3://, manifold://, ...) are written by the checkpointer's iopath
    PathManager, as with Detectron2's own checkpointer."""
    from iopath.common.file_io import PathHandler, PathManager

    class MemHandler(PathHandler):  # "mem://x" is the local file tmp_path/x, reached only through the manager
        opened = []

        def _get_supported_prefixes(self):
            return ["mem://"]

        def _open(self, path, mode="r", buffering=-1, **kwargs):
            self.opened.append((path, mode))
            return open(tmp_path / path[len("mem://"):], mode)

        def _exists(self, path, **kwargs):
            return (tmp_path / path[len("mem://"):]).exists()

        def _get_local_path(self, path, **kwargs):
            return str(tmp_path / path[len("mem://"):])

    manager = PathManager()
    manager.register_handler(MemHandler())
    model = nn.Linear(3, 2)
    ckpt = DefectCheckpointer(model, save_dir="mem://run")
    ckpt.path_manager = manager
    (tmp_path / "run").mkdir()
    ckpt.save("model_final", iteration=3)
    assert ("mem://run/model_final.pth", "wb") in MemHandler.opened
    assert (tmp_path / "run" / "last_checkpoint").read_text() == "model_final.pth"
    loaded = torch.load(tmp_path / "run" / "model_final.pth", weights_only=True)
    assert loaded["iteration"] == 3 and torch.equal(loaded["model"]["weight"], model.weight)
