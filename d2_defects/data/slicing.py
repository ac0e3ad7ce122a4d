"""Sliced training (``INPUT.SLICE.*``): the training records become tiles of their images, drawn at load time.

:func:`slice_records` turns each image record into one record per tile of the grid of sliced inference
(:func:`d2_defects.utils.tiles.tile_grid`: tiles of ``SIZE`` px every ``size - int(OVERLAP * size)`` px, border tiles
shifted inside). A tile record is the image record with ``"slice": [x0, y0, x1, y1]``, the tile's ``height`` /
``width``, and its boxes in tile coordinates (``XYXY_ABS``); :class:`~d2_defects.data.mapper.DefectDatasetMapper`
crops the decoded image to the slice before anything else, so the augmentations, copy-paste (which pastes from the
whole images), every meta-architecture and Detectron2's samplers see ordinary records. Nothing is written to disk.

A box cut by a tile (``MIN_VISIBLE``): when at least ``MIN_VISIBLE`` of its area lies inside the tile it is kept,
clipped to the tile; when a smaller, non-zero part lies inside, the **tile is dropped**: those pixels show part of
a defect and must not be taught as background (Detectron2 has no ignore regions; iscrowd boxes are removed by its
mapper, not ignored). Small boxes are always whole in some tile when the overlap is larger than they are; boxes
larger than a tile are learnt from the full image (``INCLUDE_FULL``).

Tiles without any box (``EMPTY_RATIO``): ``round(EMPTY_RATIO * number of tiles with boxes)`` of them are kept as
negatives, drawn over the whole dataset with a generator seeded by ``seed`` (the same on every rank and run), normal
images' tiles included. ``INCLUDE_FULL`` also keeps every image record unchanged, as the model sees whole images at
test time with ``TEST.SLICE.INCLUDE_FULL``.
"""
import copy
import logging

import numpy as np
from detectron2.structures import BoxMode

from ..utils.errors import ConfigError
from ..utils.tiles import box_visibility, tile_grid

__all__ = ["slice_records", "slice_train_options", "write_sliced_dataset"]

logger = logging.getLogger(__name__)


def slice_train_options(cfg):
    """Validated ``INPUT.SLICE`` options (dict: size, overlap, min_visible, empty_ratio, include_full); a bad value
    is a :class:`ConfigError` naming its key."""
    s = cfg.INPUT.SLICE
    size = [int(v) for v in s.SIZE]
    if len(size) != 2 or min(size) <= 0:
        raise ConfigError(f"INPUT.SLICE.SIZE must be (height, width) in px, both > 0; got {tuple(s.SIZE)}")
    if not 0 <= s.OVERLAP < 1:
        raise ConfigError(f"INPUT.SLICE.OVERLAP must be a fraction in [0, 1); got {s.OVERLAP}")
    if not 0 < s.MIN_VISIBLE <= 1:
        raise ConfigError(f"INPUT.SLICE.MIN_VISIBLE must be a fraction in (0, 1]; got {s.MIN_VISIBLE}")
    if s.EMPTY_RATIO < 0:
        raise ConfigError(f"INPUT.SLICE.EMPTY_RATIO must be >= 0 (empty tiles per tile with defects); got {s.EMPTY_RATIO}")
    if cfg.MODEL.MASK_ON or cfg.MODEL.KEYPOINT_ON:
        raise ConfigError("INPUT.SLICE.ENABLED: sliced training cuts boxes only (MODEL.MASK_ON and MODEL.KEYPOINT_ON "
                          "must be False)")
    return dict(size=tuple(size), overlap=float(s.OVERLAP), min_visible=float(s.MIN_VISIBLE),
                empty_ratio=float(s.EMPTY_RATIO), include_full=bool(s.INCLUDE_FULL))


def _tile_record(record, tile, boxes, annotations, min_visible):
    """The record of one tile, or None when a box is cut below ``min_visible``; ``boxes`` are XYXY_ABS."""
    x0, y0, x1, y1 = tile
    anns = []
    for box, ann in zip(boxes, annotations):
        v = box_visibility(box, tile)
        if v <= 0:
            continue
        if v < min_visible:
            return None
        clipped = [max(box[0], x0) - x0, max(box[1], y0) - y0, min(box[2], x1) - x0, min(box[3], y1) - y0]
        tile_ann = dict(ann, bbox=clipped, bbox_mode=BoxMode.XYXY_ABS)
        tile_ann.pop("segmentation", None)  # image coordinates; sliced training cuts boxes only
        anns.append(tile_ann)
    out = {k: v for k, v in record.items() if k != "annotations"}
    out.update(height=y1 - y0, width=x1 - x0, slice=[x0, y0, x1, y1], annotations=anns)
    return out


def slice_records(records, size, overlap=0.2, min_visible=0.5, empty_ratio=1.0, include_full=True, seed=0):
    """
    The training records of sliced training (see the module docstring).

    Args:
        records (list[dict]): Detectron2 dataset dicts with ``height``, ``width`` and boxes (any ``bbox_mode``).
        size (tuple): tile (height, width), px. overlap (float): fraction in [0, 1).
        min_visible (float): in (0, 1]; empty_ratio (float): >= 0; include_full (bool); seed (int).
    Returns:
        list[dict]: tile records (with ``slice``) in image order, then, with ``include_full``, the image records.
    """
    th, tw = size
    positive, empty, dropped = [], [], 0  # (image index, tile record)
    for i, r in enumerate(records):
        anns = r.get("annotations", [])
        boxes = [BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
        for tile in tile_grid(r["height"], r["width"], th, tw, overlap):
            t = _tile_record(r, tile, boxes, anns, min_visible)
            if t is None:
                dropped += 1
            else:
                (positive if t["annotations"] else empty).append((i, t))
    n_empty = min(len(empty), int(round(empty_ratio * len(positive))))
    keep = np.random.default_rng(seed).choice(len(empty), size=n_empty, replace=False) if n_empty else []
    tiles = positive + [empty[int(k)] for k in keep]
    tiles.sort(key=lambda it: (it[0], it[1]["slice"][1], it[1]["slice"][0]))  # image order, then row by row
    out = [t for _, t in tiles] + ([copy.copy(r) for r in records] if include_full else [])
    logger.info(f"sliced training: {len(records)} images -> {len(positive)} tiles with defects, {n_empty} of "
                f"{len(empty)} empty tiles (EMPTY_RATIO {empty_ratio}), {dropped} tiles dropped (a box cut below "
                f"MIN_VISIBLE {min_visible})" + (f", + the {len(records)} whole images" if include_full else ""))
    return out


def write_sliced_dataset(coco, image_root, out_dir, size, overlap=0.2, min_visible=0.5, empty_ratio=1.0, seed=0,
                         progress=None):
    """
    Write the tiles of sliced training to disk, for users who want them offline: ``out_dir/images/<image
    stem>_x<x0>_y<y0>.png`` and ``out_dir/annotations.json`` (COCO, the input's categories and ids; ``file_name``
    relative to ``out_dir/images``), with the rules of :func:`slice_records` (no whole images). Images are read by the
    project's reader (16-bit images scaled to 8 bits) and written as 8-bit PNG.

    Args:
        coco (dict): a COCO dict (``file_name`` relative to ``image_root``), e.g. from ``load_source``.
    Returns:
        str: the path of the json.
    """
    import os

    import cv2

    from ..utils.fileio import atomic_write_json
    from ..utils.image_io import read_image

    anns_per_image = {}
    for a in coco.get("annotations", []):
        anns_per_image.setdefault(a["image_id"], []).append(a)
    records = [{"file_name": img["file_name"], "image_id": img["id"], "height": img["height"], "width": img["width"],
                "annotations": [{"bbox": a["bbox"], "bbox_mode": BoxMode.XYWH_ABS, "category_id": a["category_id"],
                                 "iscrowd": a.get("iscrowd", 0)} for a in anns_per_image.get(img["id"], [])]}
               for img in coco["images"]]
    tiles = slice_records(records, size, overlap, min_visible, empty_ratio, include_full=False, seed=seed)
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    images, annotations, cache = [], [], {}
    for t in (progress(tiles, desc="writing tiles") if progress else tiles):
        if t["file_name"] not in cache:
            cache.clear()  # tiles of one image are consecutive: keep one decoded image
            cache[t["file_name"]] = read_image(os.path.join(image_root, t["file_name"]), format="BGR")
        x0, y0, x1, y1 = t["slice"]
        name = f"{os.path.splitext(t['file_name'])[0].replace(os.sep, '_')}_x{x0}_y{y0}.png"
        cv2.imwrite(os.path.join(img_dir, name), cache[t["file_name"]][y0:y1, x0:x1])
        images.append({"id": len(images) + 1, "file_name": name, "width": x1 - x0, "height": y1 - y0,
                       "source": {"file_name": t["file_name"], "image_id": t["image_id"], "slice": [x0, y0, x1, y1]}})
        for a in t["annotations"]:
            bx0, by0, bx1, by1 = a["bbox"]
            annotations.append({"id": len(annotations) + 1, "image_id": len(images), "category_id": a["category_id"],
                                "bbox": [bx0, by0, bx1 - bx0, by1 - by0], "area": (bx1 - bx0) * (by1 - by0),
                                "iscrowd": a["iscrowd"]})
    path = os.path.join(out_dir, "annotations.json")
    atomic_write_json(path, {"images": images, "annotations": annotations, "categories": coco["categories"]})
    return path
