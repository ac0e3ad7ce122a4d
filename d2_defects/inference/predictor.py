"""Batched inference on image files, with the config's test resolution or test-time augmentation."""
import glob
import os

import numpy as np
import torch
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.modeling import build_model
from PIL import Image

from ..checkpoint import DefectCheckpointer
from ..utils.errors import ConfigError, InputNotFoundError
from ..utils.image_io import IMAGE_EXTENSIONS, check_window
from ..utils.image_io import read_image as _read_any_depth

__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "list_images", "read_image", "BatchPredictor"]



class ImageReadError(OSError):
    """An image file that cannot be decoded."""


def list_images(spec):
    """
    Image files named by ``spec``: a folder (searched recursively), a glob pattern (``**`` allowed) or one
    file. Sorted, so that image ids are reproducible.

    Raises:
        FileNotFoundError: when nothing matches.
    """
    if os.path.isdir(spec):
        files = [os.path.join(d, f) for d, _, fs in os.walk(spec) for f in fs]
    elif os.path.isfile(spec):
        return [spec]
    else:
        files = [f for f in glob.glob(spec, recursive=True) if os.path.isfile(f)]
    files = sorted(f for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise InputNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {spec}")
    return files


def read_image(path, input_format="BGR", high_bit_window=None):
    """
    Read ``path`` as HxWxC uint8 in ``input_format``; any decoding problem is an :class:`ImageReadError`.
    16-bit images are scaled to 0..255 by ``high_bit_window`` (``INPUT.HIGH_BIT_DEPTH.WINDOW``; None: full range),
    see :mod:`d2_defects.utils.image_io`.
    """
    try:
        img = _read_any_depth(path, format=input_format, window=high_bit_window)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from None
    if img.ndim != 3 or img.size == 0:
        raise ImageReadError(f"cannot read image {path}: unexpected shape {img.shape}")
    return np.ascontiguousarray(img)


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files, input_format, high_bit_window=None):
        self.files, self.input_format, self.high_bit_window = files, input_format, high_bit_window

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return i, read_image(self.files[i], self.input_format, self.high_bit_window), None
        except ImageReadError as e:
            return i, None, str(e)


class BatchPredictor:
    """
    Like Detectron2's ``DefaultPredictor``, for batches of images and optional test-time augmentation.

    Example::

        predictor = BatchPredictor(cfg)              # builds the model, loads cfg.MODEL.WEIGHTS
        for path, image, output, error in predictor.predict_files(list_images("images/"), batch_size=4):
            ...  # output["instances"]; DefectRCNN also gives output["defect_score"]
    """

    def __init__(self, cfg, model=None):
        """
        Args:
            cfg (CfgNode): model config; ``MODEL.DEVICE`` chooses CPU/CUDA, ``TEST.AUG.ENABLED`` turns on TTA,
                ``TEST.SLICE.ENABLED`` sliced inference.
            model (nn.Module or None): an already built model (weights are then not loaded), or an exported one
                (``d2_defects.inference.export.ExportedDetector``).
        """
        self.cfg = cfg.clone()
        try:
            self.high_bit_window = check_window(cfg.INPUT.HIGH_BIT_DEPTH.WINDOW)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if model is None:
            model = build_model(self.cfg)
            if cfg.MODEL.WEIGHTS:
                DefectCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        model.eval()
        if cfg.TEST.SLICE.ENABLED:
            from ..modeling.slicing import SlicedDetector

            model = SlicedDetector(cfg, model, tta=cfg.TEST.AUG.ENABLED).eval()
            self.resize = None  # slicing (and TTA) resize by themselves
        elif cfg.TEST.AUG.ENABLED:
            from ..modeling.tta import DefectTTA

            model = DefectTTA(cfg, model).eval()
            self.resize = None  # TTA resizes itself
        else:
            self.resize = ResizeShortestEdge(
                [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
            )
        self.model = model
        self.input_format = cfg.INPUT.FORMAT

    def __call__(self, images):
        """
        Args:
            images (list[ndarray]): HxWxC uint8 images in ``cfg.INPUT.FORMAT``.
        Returns:
            list[Instances]: per image, on the CPU, boxes in the image's pixel coordinates.
        """
        return [o["instances"] for o in self.predict(images)]

    @torch.no_grad()
    def predict(self, images):
        """
        Like ``__call__``, returning the model's whole output per image: a dict with ``instances`` (on the
        CPU) and any image-level outputs of the model (e.g. DefectRCNN's ``defect_score``, a float).
        """
        inputs = []
        for img in images:
            h, w = img.shape[:2]
            if self.resize is not None:
                img = self.resize.get_transform(img).apply_image(img)
            inputs.append({"image": torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1))),
                           "height": h, "width": w})
        return [dict(o, instances=o["instances"].to("cpu")) for o in self.model(inputs)]

    def predict_files(self, files, batch_size=1, num_workers=0, progress=None):
        """
        Yield ``(path, image, output, error)`` per file, in order (``image`` in ``cfg.INPUT.FORMAT``,
        ``output`` as in :meth:`predict`); ``image`` and ``output`` are None and ``error`` a message when the
        file cannot be read (the run goes on).

        Args:
            progress (callable or None): e.g. ``tqdm``, wraps the per-image iteration.
        """
        loader = torch.utils.data.DataLoader(
            _ImageFiles(files, self.input_format, self.high_bit_window), batch_size=batch_size, num_workers=num_workers,
            collate_fn=list,
        )
        bar = progress(total=len(files), unit="img") if progress else None
        try:
            for batch in loader:
                good = [(i, img) for i, img, _ in batch if img is not None]
                outs = dict(zip([i for i, _ in good], self.predict([img for _, img in good]))) if good else {}
                for i, img, err in batch:
                    yield files[i], img, outs.get(i), err
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()
