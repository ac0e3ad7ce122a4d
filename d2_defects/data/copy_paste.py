"""Copy-paste augmentation: defect crops from the training set pasted onto other images.

The crops are exact pixel copies of ground-truth boxes (rounded outwards to whole pixels); each pasted
crop gets a box equal to the pasted region. A crop is only placed where it does not intersect any
existing or already pasted box, so no defect is covered. Normal images (no defects) get pastes with
probability ``prob_normal`` (default 1), images with defects with ``prob``.

With ``use_masks`` (mask models, ``MODEL.MASK_ON``) a defect with a mask is pasted by its mask: only the
pixels under the mask are copied (the new background shows around a thin crack), and the pasted annotation
gets the mask, moved with the crop (polygons shifted exactly, RLE as an RLE of the target image).
"""
import logging
import math
from collections import OrderedDict

import numpy as np
from detectron2.structures import BoxMode

from ..utils.masks import decode_segmentation, encode_mask
from ..utils.image_io import read_image

logger = logging.getLogger(__name__)

__all__ = ["CopyPaste"]


def _xyxy(ann):
    return BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)


class CopyPaste:
    """
    Args:
        dataset_dicts (list[dict]): the training records (Detectron2 format) the crops come from.
        image_format (str): ``INPUT.FORMAT``, used to read the source images.
        prob_normal, prob (float): probability of pasting onto a normal / defective image.
        max_objects (int): up to this many crops per image (at least 1 when pasting).
        class_ids (set[int] or None): contiguous class ids eligible as crops (None = all).
        max_tries (int): random placements tried per crop before giving up on it.
        cache_images (int): source images kept in memory (LRU).
        high_bit_window (tuple or None): scaling of 16-bit images (``INPUT.HIGH_BIT_DEPTH.WINDOW``).
        cache_mb (float): memory for cached crops, per data-loader worker.
        use_masks (bool): paste by the mask of defects that have one (see the module docstring).
    """

    def __init__(self, dataset_dicts, image_format="BGR", prob_normal=1.0, prob=0.3, max_objects=3,
                 class_ids=None, max_tries=20, cache_images=8, cache_mb=256, high_bit_window=None,
                 use_masks=False):
        # (file_name, (x0, y0, x1, y1) int pixel box, category_id, segmentation or None, (height, width))
        self.bank = []
        for d in dataset_dicts:
            for a in d.get("annotations", []):
                if a.get("iscrowd", 0) or (class_ids is not None and a["category_id"] not in class_ids):
                    continue
                x0, y0, x1, y1 = _xyxy(a)
                box = (max(int(math.floor(x0)), 0), max(int(math.floor(y0)), 0),
                       min(int(math.ceil(x1)), d["width"]), min(int(math.ceil(y1)), d["height"]))
                if box[2] > box[0] and box[3] > box[1]:
                    segm = a.get("segmentation") if use_masks else None
                    self.bank.append((d["file_name"], box, a["category_id"], segm or None, (d["height"], d["width"])))
        self.image_format = image_format
        self.high_bit_window = high_bit_window  # INPUT.HIGH_BIT_DEPTH.WINDOW (see d2_defects/utils/image_io.py)
        self.prob_normal, self.prob, self.max_objects = prob_normal, prob, max_objects
        self.max_tries, self.cache_images = max_tries, cache_images
        self.cache_mb = cache_mb
        self._cache, self._crops, self._crop_bytes = OrderedDict(), {}, 0
        if not self.bank:
            logger.warning("copy-paste: the training set has no boxes to paste; it does nothing")

    def _crop(self, index):
        """The pixels of bank entry ``index`` and its mask cut to the crop (bool, or None without a mask); crops
        are cached (they are small), up to ``cache_mb``."""
        if index in self._crops:
            return self._crops[index]
        fname, (x0, y0, x1, y1), _, segm, (h, w) = self.bank[index]
        if fname in self._cache:
            self._cache.move_to_end(fname)
            img = self._cache[fname]
        else:
            img = read_image(fname, format=self.image_format, window=self.high_bit_window)
            self._cache[fname] = img
            if len(self._cache) > self.cache_images:
                self._cache.popitem(last=False)
        crop = np.ascontiguousarray(img[y0:y1, x0:x1])
        mask = None
        if segm is not None:
            mask = np.ascontiguousarray(decode_segmentation(segm, h, w)[y0:y1, x0:x1])
        nbytes = crop.nbytes + (mask.nbytes if mask is not None else 0)
        if self._crop_bytes + nbytes <= self.cache_mb * 2**20:
            self._crops[index] = (crop, mask)
            self._crop_bytes += nbytes
        return crop, mask

    def __call__(self, image, dataset_dict, rng=np.random):
        """
        Paste crops into ``image`` (modified in place) and append their annotations to
        ``dataset_dict["annotations"]``.

        Returns:
            list[dict]: the annotations added (XYXY_ABS boxes).
        """
        anns = dataset_dict.setdefault("annotations", [])
        p = self.prob if any(not a.get("iscrowd", 0) for a in anns) else self.prob_normal
        if not self.bank or rng.rand() >= p:
            return []
        occupied = [_xyxy(a) for a in anns]
        H, W = image.shape[:2]
        added = []
        for _ in range(rng.randint(1, self.max_objects + 1)):
            index = rng.randint(len(self.bank))
            fname, (x0, y0, x1, y1), cat, segm, _ = self.bank[index]
            if fname == dataset_dict.get("file_name"):
                continue
            cw, ch = x1 - x0, y1 - y0
            if cw > W or ch > H:
                continue
            for _ in range(self.max_tries):
                px, py = rng.randint(0, W - cw + 1), rng.randint(0, H - ch + 1)
                new = (px, py, px + cw, py + ch)
                if all(new[2] <= b[0] or new[0] >= b[2] or new[3] <= b[1] or new[1] >= b[3] for b in occupied):
                    break
            else:
                continue
            crop, mask = self._crop(index)
            if crop.shape[2] != image.shape[2]:
                continue
            ann = {"bbox": [float(v) for v in new], "bbox_mode": BoxMode.XYXY_ABS, "category_id": cat,
                   "iscrowd": 0}
            if mask is None:
                image[py:py + ch, px:px + cw] = crop
            else:
                image[py:py + ch, px:px + cw][mask] = crop[mask]
                ann["segmentation"] = _moved_mask(segm, mask, px - x0, py - y0, (px, py), (H, W))
            anns.append(ann)
            added.append(ann)
            occupied.append(new)
        return added


def _moved_mask(segm, crop_mask, dx, dy, at, size):
    """The pasted defect's mask: polygons shifted by (dx, dy); else ``crop_mask`` placed at ``at`` (x, y) in an
    image of ``size`` (h, w), as RLE."""
    if isinstance(segm, list):
        return [[v + (dx if i % 2 == 0 else dy) for i, v in enumerate(poly)] for poly in segm]
    full = np.zeros(size, bool)
    full[at[1]:at[1] + crop_mask.shape[0], at[0]:at[0] + crop_mask.shape[1]] = crop_mask
    return encode_mask(full)
