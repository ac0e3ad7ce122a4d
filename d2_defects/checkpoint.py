"""A Detectron2 checkpointer that writes atomically and loads with ``weights_only`` semantics."""
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["CheckpointError", "DefectCheckpointer"]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or not a checkpoint. The message names the file."""


def _atomic_write(path, write_fn, mode="wb"):
    # Write next to the target and rename: a run killed mid-write leaves the old file (or none),
    # never a truncated one; os.replace is atomic on POSIX and Windows.
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class DefectCheckpointer(DetectionCheckpointer):
    """
    ``DetectionCheckpointer`` with two changes:

    - ``save`` writes ``<name>.pth`` and then ``last_checkpoint`` atomically (temporary file + rename),
      so ``last_checkpoint`` never points at a partial file;
    - ``.pth``/``.pt`` files load with ``torch.load(weights_only=True)``; a missing, truncated or
      foreign file raises :class:`CheckpointError` naming it.
    """

    def save(self, name, **kwargs):
        # Same content as fvcore's Checkpointer.save (fvcore 0.1.5.post20221221); only the write differs.
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        os.makedirs(self.save_dir, exist_ok=True)
        _atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(save_file, lambda f: f.write(last_filename_basename), mode="w")

    def load(self, path, checkpointables=None):
        if path and not os.path.isfile(path):
            local = self.path_manager.get_local_path(path) if "://" in path else path
            if not os.path.isfile(local):
                raise CheckpointError(f"checkpoint not found: {path}")
            path = local
        return super().load(path, checkpointables)

    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            return super()._load_file(filename)
        try:
            data = torch.load(filename, map_location=torch.device("cpu"), weights_only=True)
        except Exception as e:  # torch raises several types for bad files; all mean "not loadable"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"cannot load checkpoint {filename}: {first} (truncated, corrupt or not a checkpoint)"
            ) from None
        if not isinstance(data, dict):
            raise CheckpointError(f"cannot load checkpoint {filename}: expected a dict, got {type(data)}")
        if "model" not in data:
            data = {"model": data}
        return data
