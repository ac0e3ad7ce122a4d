"""A Detectron2 checkpointer that writes atomically, loads only data (never code) and refuses weights of
another architecture."""
import io
import logging
import os
import pickle
import re

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .utils.errors import CheckpointError
from .utils.fileio import atomic_write

__all__ = ["CheckpointError", "DefectCheckpointer", "load_pkl_weights", "PKL_ALLOWED_GLOBALS", "check_loaded_keys",
           "loading_table"]

logger = logging.getLogger(__name__)

# The only globals a Detectron2 / Caffe2 model-zoo ``.pkl`` needs: numpy arrays and scalars, ordered dicts,
# and ``_codecs.encode`` (how protocol-2 pickles store bytes). Anything else (os.system, eval, a class of
# some package, ...) is refused before it is looked up, so a crafted file cannot run code.
PKL_ALLOWED_GLOBALS = frozenset({
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
})


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in PKL_ALLOWED_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise _RefusedGlobal(f"persistent id {pid!r}")


def load_pkl_weights(filename):
    """
    Unpickle a ``.pkl`` weights file with only the data types of Detectron2's model-zoo files (numpy arrays,
    dicts, lists, numbers, strings; :data:`PKL_ALLOWED_GLOBALS`).

    Raises:
        CheckpointError: naming the file, for any other object (which could run code), or a file that is
            empty, truncated or not a pickle of a dict.
    """
    try:
        with open(filename, "rb") as f:
            data = _DataOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except _RefusedGlobal as e:
        raise CheckpointError(
            f"refusing to load {filename}: it contains a Python object other than weights ({e}); a .pkl given as "
            "weights may only hold numpy arrays, dicts, lists, numbers and strings (Detectron2 model-zoo format)"
        ) from None
    except Exception as e:  # any unpickling failure of a bad file: EOFError, UnpicklingError, ValueError, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load weights {filename}: not a readable .pkl weights file ({reason})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"cannot load weights {filename}: expected a dict of weights, got {type(data).__name__}")
    return data


def _top_module(key):
    return key.split(".", 1)[0]


def check_loaded_keys(model, filename, loaded, unused, ignored=("pixel_mean", "pixel_std")):
    """
    Raise :class:`CheckpointError` when the file at ``filename`` was made for another architecture.

    Args:
        model (nn.Module): the model loaded into.
        loaded (set[str]): the model's state-dict keys that got a tensor (right name and shape) from the file.
        unused (int or list[str]): tensors of the file that fit no key of the model (names, or only a count).

    The rules:

    - no tensor of the file fits the model: error;
    - a top-level module other than ``backbone`` (``proposal_generator``, ``roi_heads``, ``head``, ...) gets
      nothing from the file while the file carries more than two tensors the model does not use (the weights
      of some other heads): error naming the modules left at random init and the file's unused tensors.

    A backbone-only checkpoint (ImageNet weights, a model's ``backbone.*``) is recognised as one whose tensors
    all land in ``backbone.*`` apart from at most two (an ImageNet classifier's weight and bias): it is
    accepted, and the heads start from their random initialisation (logged).
    """
    keys = [k for k in model.state_dict().keys() if k not in ignored and not k.endswith("num_batches_tracked")]
    n_unused = unused if isinstance(unused, int) else len(unused)
    if not loaded:
        shown = "" if isinstance(unused, int) else f" (the file has e.g. {', '.join(sorted(unused)[:3])})"
        raise CheckpointError(
            f"{filename}: none of the model's {len(keys)} weight tensors are in this file{shown}; it was made for "
            f"another model (check MODEL.WEIGHTS against MODEL.META_ARCHITECTURE and the backbone keys)"
        )
    modules = {}
    for k in keys:
        if "." in k:
            modules.setdefault(_top_module(k), []).append(k)
    empty = sorted(m for m, ks in modules.items() if m != "backbone" and not any(k in loaded for k in ks))
    if not empty:
        return
    if n_unused > 2:
        what = "" if isinstance(unused, int) else \
            f"; the file has {n_unused} tensors this model does not use, e.g. {', '.join(sorted(unused)[:4])}"
        raise CheckpointError(
            f"{filename} is a checkpoint of another architecture: the model's {', '.join(empty)} "
            f"({sum(len(modules[m]) for m in empty)} tensors) would stay at random init{what}. Use weights of "
            f"this model (MODEL.META_ARCHITECTURE {type(model).__name__}), or a backbone-only checkpoint"
        )
    logger.info(f"{filename}: backbone-only checkpoint; {', '.join(empty)} start from random initialisation")


def _module_of(key):
    parts = key.split(".")
    if parts[0] == "backbone" and len(parts) > 2:
        return "backbone.bottom_up" if parts[1] == "bottom_up" else "backbone (FPN)"
    if parts[0] == "roi_heads" and len(parts) > 2:
        return f"roi_heads.{parts[1]}"
    return parts[0]


def loading_table(model, loaded, incorrect_shapes, unused):
    """
    One compact table of a checkpoint load, per module of ``model``: tensors loaded, skipped because their
    shape differs (Detectron2 loads nothing of those: no reshaping; ``tools/convert_weights.py`` converts
    class counts and cascade stages), and missing from the file (random init); then the file's tensors that
    fit no key of the model.
    """
    keys = [k for k in model.state_dict()
            if k not in ("pixel_mean", "pixel_std") and not k.endswith("num_batches_tracked")]
    skipped = {k for k, *_ in incorrect_shapes}
    rows = {}
    for k in keys:
        r = rows.setdefault(_module_of(k), [0, 0, 0])
        r[0 if k in loaded else 1 if k in skipped else 2] += 1
    width = max([len(m) for m in rows] + [6])
    lines = [f"{'module':<{width}}  loaded  skipped (shape)  missing"]
    lines += [f"{m:<{width}}  {a:>6}  {b:>15}  {c:>7}" for m, (a, b, c) in rows.items()]
    n_unused = unused if isinstance(unused, int) else len(unused)
    shown = "" if isinstance(unused, int) or not unused else f": {', '.join(sorted(unused)[:5])}" + \
        (", ..." if n_unused > 5 else "")
    lines.append(f"tensors of the file that fit no key of the model: {n_unused}{shown}")
    return "\n".join(lines)


def _first_line(e):
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


class DefectCheckpointer(DetectionCheckpointer):
    """
    ``DetectionCheckpointer`` with two changes:

    - ``save`` writes ``<name>.pth`` and then ``last_checkpoint`` atomically (temporary file + rename),
      so ``last_checkpoint`` never points at a partial file (local folders; other iopath locations are written
      by fvcore through ``path_manager``);
    - ``.pth``/``.pt`` files load with ``torch.load(weights_only=True)``, ``.pkl`` files (Detectron2 model-zoo
      format) with a data-only unpickler (:func:`load_pkl_weights`); a missing, truncated, unsafe or foreign
      file raises :class:`CheckpointError` naming it;
    - weights made for another architecture are refused (:func:`check_loaded_keys`); a backbone-only
      checkpoint is accepted.
    """

    _loading_file = "<checkpoint>"

    def _local(self):
        return "://" not in (self.save_dir or "")

    def save(self, name, **kwargs):
        # Same content as fvcore's Checkpointer.save (fvcore 0.1.5.post20221221); only the write differs.
        # A save_dir of another iopath handler (s3://, manifold://, ...) is written by fvcore through
        # self.path_manager, as before (no atomic rename there).
        if not self._local():
            return super().save(name, **kwargs)
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
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        if not self._local():
            return super().tag_last_checkpoint(last_filename_basename)
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(save_file, lambda f: f.write(last_filename_basename), mode="w")

    def load(self, path, checkpointables=None):
        if path and not os.path.isfile(path):
            local = self.path_manager.get_local_path(path) if "://" in path else path
            if not os.path.isfile(local):
                raise CheckpointError(f"checkpoint not found: {path}")
            path = local
        self._loading_file = path
        return super().load(path, checkpointables)

    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            return self._load_pkl(filename)
        try:
            data = torch.load(filename, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" not in str(e):
                raise CheckpointError(f"cannot load checkpoint {filename}: {_first_line(e)} "
                                      "(truncated, corrupt or not a checkpoint)") from None
            found = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(e))
            raise CheckpointError(
                f"refusing to load {filename}: it contains a Python object other than tensors and plain data"
                f"{f' ({found.group(1)})' if found else ''}; only weights are loaded from checkpoints"
            ) from None
        except Exception as e:  # torch raises several types for bad files; all mean "not loadable"
            raise CheckpointError(
                f"cannot load checkpoint {filename}: {_first_line(e)} (truncated, corrupt or not a checkpoint)"
            ) from None
        if not isinstance(data, dict):
            raise CheckpointError(f"cannot load checkpoint {filename}: expected a dict, got {type(data)}")
        if "model" not in data:
            data = {"model": data}
        return data

    def _load_pkl(self, filename):
        # Same result as DetectionCheckpointer._load_file for .pkl (detectron2 a59f056), read by the
        # data-only unpickler instead of pickle.load.
        data = load_pkl_weights(filename)
        if "model" in data and "__author__" in data:  # Detectron2 model-zoo format
            self.logger.info("Reading a file from '{}'".format(data["__author__"]))
            return data
        if "blobs" in data:  # Caffe2 / Detectron1 detection models
            data = data["blobs"]
        if not isinstance(data, dict):
            raise CheckpointError(f"cannot load weights {filename}: 'blobs' is not a dict")
        data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}

    def _load_model(self, checkpoint):
        heuristics = checkpoint.get("matching_heuristics", False)
        n_file = len(checkpoint.get("model", {}))
        incompatible = super()._load_model(checkpoint)
        model_keys = set(self.model.state_dict().keys())
        loaded = model_keys - set(incompatible.missing_keys) - {k for k, *_ in incompatible.incorrect_shapes}
        # fvcore does not report BatchNorm counters as missing; they are not weights
        loaded = {k for k in loaded if k not in ("pixel_mean", "pixel_std") and not k.endswith("num_batches_tracked")}
        if heuristics:  # names were matched by suffix; the file's tensors that matched nothing were dropped
            unused = max(0, n_file - len(loaded) - len(incompatible.incorrect_shapes))
        else:
            unused = list(incompatible.unexpected_keys)
        self.logger.info(f"Loaded {self._loading_file}:\n" + loading_table(
            self.model, loaded, incompatible.incorrect_shapes, unused))
        check_loaded_keys(self.model, self._loading_file, loaded, unused)
        return incompatible
