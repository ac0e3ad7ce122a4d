"""Drawing ground truth and predictions side by side."""
import json
import os

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import Visualizer
from .errors import DatasetError, InputNotFoundError
from .fileio import check_can_write

__all__ = ["load_coco_results", "draw_dataset_predictions", "draw_boxes"]


def load_coco_results(path, dataset_name):
    """
    Read a COCO results json and group it by image id, with contiguous class ids.

    Returns:
        dict[int, list[dict]]: image id -> [{"bbox": XYXY, "score", "category_id" (contiguous)}], plus
        ``segmentation`` (RLE) for mask results
    """
    if not os.path.isfile(path):
        raise InputNotFoundError(f"results file not found: {path}")
    with open(path) as f:
        dets = json.load(f)
    meta = MetadataCatalog.get(dataset_name)
    id_map = getattr(meta, "thing_dataset_id_to_contiguous_id", None)
    out = {}
    for i, d in enumerate(dets):
        cid = d["category_id"]
        if id_map is not None:
            if cid not in id_map:
                raise DatasetError(f"{path}: detection {i} has category id {cid}, unknown to {dataset_name}")
            cid = id_map[cid]
        box = BoxMode.convert(list(d["bbox"]), BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
        det = {"bbox": box, "score": d["score"], "category_id": cid}
        if d.get("segmentation"):
            det["segmentation"] = d["segmentation"]
        out.setdefault(d["image_id"], []).append(det)
    return out


def draw_boxes(image_rgb, boxes, labels, metadata, class_ids=None, max_side=1600, masks=None):
    """
    Draw labelled boxes (and masks) on an RGB image; large images are drawn at ``max_side`` pixels so labels
    stay readable.

    Args:
        image_rgb (ndarray): HxWx3 uint8 RGB.
        boxes (ndarray): (N, 4) XYXY absolute.
        labels (list[str]): one label per box.
        class_ids (list[int] or None): contiguous class per box; boxes of a class share a colour.
        masks (list[ndarray] or None): one bool HxW mask per box (image size), drawn filled.
    Returns:
        ndarray: HxWx3 uint8 RGB.
    """
    scale = min(1.0, max_side / max(image_rgb.shape[:2]))
    if scale < 1.0:
        image_rgb = cv2.resize(image_rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        boxes = np.asarray(boxes, dtype=np.float64) * scale
        if masks is not None:
            masks = [cv2.resize(np.asarray(m, np.uint8), image_rgb.shape[1::-1], interpolation=cv2.INTER_NEAREST)
                     for m in masks]
    # small images are upscaled for the drawing so that text is legible
    up = max(1.0, 512 / max(image_rgb.shape[:2]))
    vis = Visualizer(image_rgb, metadata, scale=up)
    colors = None
    if class_ids is not None:
        palette = colormap(rgb=True, maximum=1)
        colors = [tuple(palette[c % len(palette)]) for c in class_ids]
    vis.overlay_instances(boxes=np.asarray(boxes).reshape(-1, 4), labels=labels, assigned_colors=colors,
                          masks=[np.asarray(m, bool) for m in masks] if masks is not None and len(masks) else None)
    return vis.output.get_image()


def _masks(items, h, w):
    """Decoded masks of ground-truth annotations or detections when every one has a ``segmentation``, else None."""
    if not items or not all(i.get("segmentation") for i in items):
        return None
    from .masks import decode_segmentation

    return [decode_segmentation(i["segmentation"], h, w) for i in items]


def draw_dataset_predictions(dataset_name, predictions, output_dir, num_images=8, score_threshold=0.3,
                             overwrite=False, progress=None):
    """
    Write ``num_images`` PNGs, ground truth (left) next to predictions (right), for the first images of
    ``dataset_name`` (images with defects first).

    Returns:
        list[str]: files written.
    """
    meta = MetadataCatalog.get(dataset_name)
    records = DatasetCatalog.get(dataset_name)
    records = sorted(records, key=lambda r: (len(r["annotations"]) == 0, r["image_id"]))[:num_images]
    it = progress(records, desc="drawing") if progress else records
    written = []
    for r in it:
        out = os.path.join(output_dir, f"{os.path.splitext(os.path.basename(r['file_name']))[0]}.png")
        check_can_write(out, overwrite)
        img = cv2.imread(r["file_name"], cv2.IMREAD_COLOR)
        if img is None:
            raise InputNotFoundError(f"cannot read image {r['file_name']}")
        rgb = img[:, :, ::-1]
        gt_boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in r["annotations"]]
        gt_labels = ["GT " + meta.thing_classes[a["category_id"]] for a in r["annotations"]]
        dets = [d for d in predictions.get(r["image_id"], []) if d["score"] >= score_threshold]
        det_boxes = [d["bbox"] for d in dets]
        det_labels = [f"{meta.thing_classes[d['category_id']]} {d['score']:.2f}" for d in dets]
        h, w = rgb.shape[:2]
        gt_masks = _masks(r["annotations"], h, w)
        det_masks = _masks(dets, h, w)
        left = draw_boxes(rgb, gt_boxes, gt_labels, meta, [a["category_id"] for a in r["annotations"]], masks=gt_masks)
        right = draw_boxes(rgb, det_boxes, det_labels, meta, [d["category_id"] for d in dets], masks=det_masks)
        cv2.imwrite(out, np.concatenate([left, right], axis=1)[:, :, ::-1])
        written.append(out)
    return written
