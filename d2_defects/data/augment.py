"""Geometric and photometric augmentations for defects ("defects have no up")."""
import numpy as np
from detectron2.data import transforms as T
from fvcore.transforms.transform import Transform
from ..utils.errors import ConfigError

__all__ = ["Rot90Transform", "RandomRot90", "build_defect_augmentations", "check_augmentation_config"]


class Rot90Transform(Transform):
    """
    Rotate by ``k`` x 90 degrees counter-clockwise (like ``np.rot90``), exactly, without interpolation.

    Args:
        h, w (int): size of the input image.
        k (int): number of quarter turns, 0..3.
    """

    def __init__(self, h, w, k):
        super().__init__()
        self._set_attributes(locals())
        self.k = int(k) % 4

    def apply_image(self, img):
        return np.ascontiguousarray(np.rot90(img, self.k, axes=(0, 1)))

    def apply_segmentation(self, segmentation):
        return self.apply_image(segmentation)

    def apply_coords(self, coords):
        """coords (ndarray): (N, 2) continuous x, y in the input image."""
        x, y = coords[:, 0].copy(), coords[:, 1].copy()
        if self.k == 1:  # (x, y) -> (y, w - x)
            coords[:, 0], coords[:, 1] = y, self.w - x
        elif self.k == 2:
            coords[:, 0], coords[:, 1] = self.w - x, self.h - y
        elif self.k == 3:  # (x, y) -> (h - y, x)
            coords[:, 0], coords[:, 1] = self.h - y, x
        return coords

    def inverse(self):
        h, w = (self.w, self.h) if self.k % 2 else (self.h, self.w)
        return Rot90Transform(h, w, (4 - self.k) % 4)


class RandomRot90(T.Augmentation):
    """With probability ``prob`` rotate by 90, 180 or 270 degrees (uniformly)."""

    def __init__(self, prob=0.5):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        if self._rand_range() < self.prob:
            return Rot90Transform(h, w, np.random.randint(1, 4))
        return T.NoOpTransform()


def _check_range(key, r):
    r = tuple(float(v) for v in r)
    if len(r) != 2 or not 0 <= r[0] <= r[1]:
        raise ConfigError(f"{key} must be a (low, high) range with 0 <= low <= high, got {r}")
    return r


def check_prob(key, p):
    """``p`` as a float; :class:`ConfigError` naming ``key`` unless it lies in [0, 1]."""
    if not 0.0 <= float(p) <= 1.0:
        raise ConfigError(f"{key} must be a probability in [0, 1], got {p}")
    return float(p)


def build_defect_augmentations(cfg, is_train):
    """
    Detectron2's default augmentations plus the ``INPUT.VFLIP`` / ``ROT90`` / ``PHOTOMETRIC`` ones.

    Order: 90-degree rotation (before resizing, so that the short side rule applies to the rotated
    image), Detectron2's ``ResizeShortestEdge`` + horizontal flip, vertical flip, photometric jitter.
    With every new key off, the list equals ``detectron2.data.detection_utils.build_augmentation``.
    """
    from detectron2.data.detection_utils import build_augmentation

    augs = build_augmentation(cfg, is_train)
    if not is_train:
        return augs
    if cfg.INPUT.ROT90.ENABLED:
        augs.insert(0, RandomRot90(check_prob("INPUT.ROT90.PROB", cfg.INPUT.ROT90.PROB)))
    if cfg.INPUT.VFLIP.ENABLED:
        augs.append(T.RandomFlip(check_prob("INPUT.VFLIP.PROB", cfg.INPUT.VFLIP.PROB), horizontal=False,
                                 vertical=True))
    if cfg.INPUT.PHOTOMETRIC.ENABLED:
        p = cfg.INPUT.PHOTOMETRIC
        augs.append(T.RandomBrightness(*_check_range("INPUT.PHOTOMETRIC.BRIGHTNESS", p.BRIGHTNESS)))
        augs.append(T.RandomContrast(*_check_range("INPUT.PHOTOMETRIC.CONTRAST", p.CONTRAST)))
        if cfg.INPUT.FORMAT in ("BGR", "RGB"):
            augs.append(T.RandomSaturation(*_check_range("INPUT.PHOTOMETRIC.SATURATION", p.SATURATION)))
    return augs


def check_augmentation_config(cfg):
    """Raise ``ValueError`` naming the key for a wrong ``INPUT.VFLIP/ROT90/PHOTOMETRIC/COPY_PASTE`` value."""
    i = cfg.INPUT
    check_prob("INPUT.VFLIP.PROB", i.VFLIP.PROB)
    check_prob("INPUT.ROT90.PROB", i.ROT90.PROB)
    for k in ("BRIGHTNESS", "CONTRAST", "SATURATION"):
        _check_range(f"INPUT.PHOTOMETRIC.{k}", i.PHOTOMETRIC[k])
    check_prob("INPUT.COPY_PASTE.PROB", i.COPY_PASTE.PROB)
    check_prob("INPUT.COPY_PASTE.PROB_NORMAL", i.COPY_PASTE.PROB_NORMAL)
    if int(i.COPY_PASTE.MAX_OBJECTS) < 1:
        raise ConfigError(f"INPUT.COPY_PASTE.MAX_OBJECTS must be >= 1, got {i.COPY_PASTE.MAX_OBJECTS}")
