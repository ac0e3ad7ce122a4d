"""Anchor clustering: k-means with 1 - IoU distance on ground-truth box shapes after the config's resize.

Shapes are compared centred (IoU of two boxes of sizes w x h sharing their centre), which is what matters
for RPN matching. Anchors follow Detectron2's ``DefaultAnchorGenerator``: a (size, aspect ratio) pair is a
box of area size**2 and height/width = ratio; SIZES lists sizes per FPN level, ASPECT_RATIOS is shared.
"""
import numpy as np

from .analysis import resize_scale
from ..utils.errors import DatasetError

__all__ = ["box_shapes", "shape_iou", "kmeans_iou", "anchor_shapes", "coverage", "cluster_anchors"]


def box_shapes(coco, short=None, max_size=None):
    """(N, 2) widths/heights of the boxes, after ``ResizeShortestEdge(short, max_size)`` if given."""
    sizes = {img["id"]: (img["height"], img["width"]) for img in coco["images"]}
    out = []
    for a in coco["annotations"]:
        h, w = sizes[a["image_id"]]
        s = resize_scale(h, w, short, max_size) if short else 1.0
        if a["bbox"][2] > 0 and a["bbox"][3] > 0:
            out.append((a["bbox"][2] * s, a["bbox"][3] * s))
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def shape_iou(wh, anchors):
    """IoU of centred shapes. wh (N, 2), anchors (M, 2) -> (N, M)."""
    inter = np.minimum(wh[:, None, 0], anchors[None, :, 0]) * np.minimum(wh[:, None, 1], anchors[None, :, 1])
    union = wh[:, None, 0] * wh[:, None, 1] + anchors[None, :, 0] * anchors[None, :, 1] - inter
    return inter / union


def kmeans_iou(wh, k, seed=0, iters=300):
    """
    k-means with distance 1 - IoU; centres are per-cluster medians (robust to long thin outliers).
    Initialised k-means++ style with the same distance. Returns (k, 2) shapes sorted by area.
    """
    if len(wh) < k:
        raise DatasetError(f"need at least {k} boxes to find {k} anchor shapes, got {len(wh)}")
    rng = np.random.RandomState(seed)
    centres = [wh[rng.randint(len(wh))]]
    for _ in range(1, k):
        d = (1 - shape_iou(wh, np.array(centres))).min(1) ** 2
        centres.append(wh[rng.choice(len(wh), p=d / d.sum()) if d.sum() > 0 else rng.randint(len(wh))])
    centres = np.array(centres)
    assign = None
    for _ in range(iters):
        new = shape_iou(wh, centres).argmax(1)
        if assign is not None and (new == assign).all():
            break
        assign = new
        for j in range(k):
            if (assign == j).any():
                centres[j] = np.median(wh[assign == j], axis=0)
    return centres[np.argsort(centres[:, 0] * centres[:, 1])]


def anchor_shapes(sizes, ratios):
    """
    All anchor shapes of Detectron2's ``DefaultAnchorGenerator`` config.

    Args:
        sizes (list[list[float]]): ``MODEL.ANCHOR_GENERATOR.SIZES`` (one list per level, or one shared).
        ratios (list[list[float]]): ``ASPECT_RATIOS`` (height / width; one list per level, or shared).

    Returns:
        (M, 2) array of (w, h).
    """
    levels = max(len(sizes), len(ratios))
    out = []
    for i in range(levels):
        for s in sizes[i if len(sizes) > 1 else 0]:
            for r in ratios[i if len(ratios) > 1 else 0]:
                w = np.sqrt(s * s / r)
                out.append((w, w * r))
    return np.array(out, dtype=np.float64)


def coverage(wh, anchors):
    """dict: mean best-anchor IoU and share of boxes whose best anchor has IoU >= 0.5."""
    if len(wh) == 0:
        return {"mean_best_iou": float("nan"), "share_ge_0.5": float("nan")}
    best = shape_iou(wh, anchors).max(1)
    return {"mean_best_iou": float(best.mean()), "share_ge_0.5": float((best >= 0.5).mean())}


def cluster_anchors(wh, num_levels=5, sizes_per_level=1, num_ratios=3, seed=0):
    """
    Cluster box shapes into ``num_levels * sizes_per_level`` sizes (ascending, ``sizes_per_level`` per
    FPN level, smallest on the highest-resolution level) and ``num_ratios`` shared aspect ratios.

    Returns:
        list[list[float]]: SIZES; list[list[float]]: ASPECT_RATIOS (one shared list).
    """
    k = num_levels * sizes_per_level
    shapes = kmeans_iou(wh, k, seed=seed)
    sizes = sorted(float(np.sqrt(w * h)) for w, h in shapes)
    # ratios: 1-D k-means on log(h / w), so that 1:4 and 4:1 are as far from 1:1
    logr = np.log(wh[:, 1] / wh[:, 0])
    centres = np.quantile(logr, (np.arange(num_ratios) + 0.5) / num_ratios)
    for _ in range(100):
        assign = np.abs(logr[:, None] - centres[None]).argmin(1)
        new = np.array([np.median(logr[assign == j]) if (assign == j).any() else centres[j] for j in range(num_ratios)])
        if np.allclose(new, centres):
            break
        centres = new
    ratios = sorted(round(float(np.exp(c)), 2) for c in centres)
    sizes = [[round(s, 1) for s in sizes[i * sizes_per_level:(i + 1) * sizes_per_level]] for i in range(num_levels)]
    return sizes, [ratios]
