"""Post-processing of an exported d2_defects detector; copied next to the model file as ``postprocess.py``.

The exported graph (``model.ts`` / ``model.onnx`` / ``model.xml``) returns every candidate detection above the
score thresholds of the config (boxes (N, 4) XYXY in input-image pixels, classes (N,), scores (N,)); NMS or
soft-NMS and the top-k cut run here, with numpy only, so that a line PC needs no PyTorch:

    import json
    import postprocess  # this file

    params = json.load(open("postprocess.json"))
    boxes, scores, classes = postprocess.postprocess(boxes, scores, classes, params["postprocess"],
                                                     input_size=image.shape[-2:])

Steps (the same as ``d2_defects.modeling.postprocess.select_detections``): drop candidates below
``score_thresh_per_class[class]`` (or ``score_thresh``); per class, hard NMS at ``nms_thresh`` or, with
``soft_nms``, soft-NMS (``soft_nms_method`` "linear" / "gaussian" / "hard"); sort by score (equal scores:
lower candidate index first); keep the first ``topk_per_image`` (< 0: all); with ``fragment_decay``, multiply by
``fragment_factor`` the score of each kept detection with at least ``fragment_overlap`` of its area inside a larger,
higher-scoring one of its class (0: drop it) and sort again. IoU is computed in float64 without
the "+1" convention, like ``torchvision.ops.box_iou``. Raising a threshold in ``postprocess.json`` needs no
re-export; lowering it below the exported value has no effect (those candidates are not in the graph's output).
Last, as Detectron2's ``detector_postprocess``: boxes scaled to the output size, clipped, empty ones dropped.
Mask models (Mask R-CNN heads) also output ``masks`` (N, M, M): per-box mask probabilities; with
``return_index=True`` :func:`postprocess` says which candidates it kept, and :func:`paste_masks` turns theirs into
image masks (as Detectron2's ``paste_masks_in_image``). Only numpy is imported.
"""
import math

import numpy as np

__all__ = ["postprocess", "nms", "soft_nms", "fragment_decay", "paste_masks"]

_SOFT_NMS_METHODS = ("linear", "gaussian", "hard")


def _iou(box, area, boxes, areas):
    """IoU of one box (4,) with boxes (M, 4), float64."""
    w = np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0])
    h = np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1])
    inter = np.maximum(w, 0.0) * np.maximum(h, 0.0)
    union = areas + area - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _areas(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _by_score(idx, scores):
    """``idx`` sorted by score (descending), equal scores by index (ascending)."""
    return idx[np.lexsort((idx, -scores[idx]))]


def nms(boxes, scores, classes, iou_thresh):
    """
    Greedy NMS per class (boxes of different classes never suppress each other).

    Args:
        boxes (ndarray): (N, 4) XYXY. scores (ndarray): (N,). classes (ndarray): (N,) integer ids.
        iou_thresh (float): a box is suppressed by a kept box of its class with IoU above it.
    Returns:
        keep (ndarray): (M,) int64 indices, by score (descending; equal scores: lower index first).
    """
    boxes, scores = np.asarray(boxes, np.float64), np.asarray(scores, np.float64)
    keep = []
    for c in np.unique(classes):
        idx = _by_score(np.flatnonzero(classes == c), scores)
        b = boxes[idx]
        a = _areas(b)
        # the IoU matrix of the class at once (same arithmetic as torchvision.ops.box_iou, in float64)
        w = np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0])
        h = np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1])
        inter = np.maximum(w, 0.0) * np.maximum(h, 0.0)
        union = a[None, :] + a[:, None] - inter
        # suppress[j, i]: box j (ranked before i) suppresses i if j is kept
        suppress = np.triu(np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0) > iou_thresh, 1)
        # greedy NMS as a fixed point: kept[i] = no kept box ranked before i suppresses it. Each round fixes at
        # least the next box in rank order, and the greedy result is the only fixed point (kept[i] depends only
        # on boxes ranked before i), so the loop ends with it, after a few rounds of whole-matrix operations
        kept = np.ones(len(idx), dtype=bool)
        while True:
            new = ~(suppress & kept[:, None]).any(axis=0)
            if np.array_equal(new, kept):
                break
            kept = new
        keep.extend(idx[kept])
    return _by_score(np.asarray(keep, dtype=np.int64), scores)


def soft_nms(boxes, scores, classes, method="linear", sigma=0.5, iou_thresh=0.5, score_thresh=0.001):
    """
    Soft-NMS per class, sequential, in float64: the live box with the highest score (equal: lowest index) is
    kept and decays the other live boxes of its class ("linear": by ``1 - IoU`` where IoU > ``iou_thresh``;
    "gaussian": by ``exp(-IoU^2 / sigma)``; "hard": removes them where IoU > ``iou_thresh``); boxes whose
    score falls below ``score_thresh`` are dropped.

    Returns:
        keep (ndarray): (M,) int64 indices; new_scores (ndarray): (M,) float64 decayed scores; both by
        decayed score (descending; equal scores: lower index first).
    """
    if method not in _SOFT_NMS_METHODS:
        raise ValueError(f"soft_nms: unknown method {method!r}, expected one of {_SOFT_NMS_METHODS}")
    boxes, scores = np.asarray(boxes, np.float64), np.asarray(scores, np.float64)
    keep, final = [], []
    for c in np.unique(classes):
        ids = np.flatnonzero((classes == c) & (scores >= score_thresh))
        b, s = boxes[ids], scores[ids].copy()
        a = _areas(b)
        while len(ids):
            top = np.flatnonzero(s == s.max())
            i = top[np.argmin(ids[top])]
            keep.append(ids[i])
            final.append(s[i])
            rest = np.arange(len(ids)) != i
            ids, b, s, a, box, area = ids[rest], b[rest], s[rest], a[rest], b[i], a[i]
            iou = _iou(box, area, b, a)
            if method == "linear":
                s = s * np.where(iou > iou_thresh, 1.0 - iou, 1.0)
            elif method == "gaussian":
                s = s * np.where(iou > 0, np.exp(-(iou * iou) / sigma), 1.0)
            else:
                s = np.where(iou > iou_thresh, -math.inf, s)
            alive = s >= score_thresh
            ids, b, s, a = ids[alive], b[alive], s[alive], a[alive]
    keep, final = np.asarray(keep, dtype=np.int64), np.asarray(final, dtype=np.float64)
    order = np.lexsort((keep, -final))
    return keep[order], final[order]


def fragment_decay(boxes, scores, classes, overlap=0.6, factor=0.5):
    """
    Decay the scores of fragments: detections with at least ``overlap`` of their own area inside a larger,
    higher-scoring detection of their class (all judged on the input scores).

    Args:
        boxes (ndarray): (N, 4) XYXY. scores (ndarray): (N,). classes (ndarray): (N,) integer ids.
        overlap (float): in (0, 1]. factor (float): in [0, 1); 0 drops the fragments.
    Returns:
        keep (ndarray): (M,) int64 indices, by new score (descending; equal scores: lower index first).
        new_scores (ndarray): (M,) their scores after the decay, in the dtype of ``scores``.
    """
    b = np.asarray(boxes, dtype=np.float64)
    scores = np.asarray(scores)
    classes = np.asarray(classes)
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    fragment = np.zeros(len(b), dtype=bool)
    for i in range(len(b)):
        if area[i] <= 0:
            continue
        w = np.minimum(b[:, 2], b[i, 2]) - np.maximum(b[:, 0], b[i, 0])
        h = np.minimum(b[:, 3], b[i, 3]) - np.maximum(b[:, 1], b[i, 1])
        inter = np.clip(w, 0, None) * np.clip(h, 0, None)
        fragment[i] = np.any((classes == classes[i]) & (area > area[i]) & (scores > scores[i])
                             & (inter >= overlap * area[i]))
    new_scores = np.where(fragment, scores * scores.dtype.type(factor), scores).astype(scores.dtype)
    keep = np.arange(len(b), dtype=np.int64)
    if factor == 0:
        keep = keep[~fragment]
    keep = keep[np.lexsort((keep, -new_scores[keep]))]
    return keep, new_scores[keep]


def postprocess(boxes, scores, classes, params, input_size, output_size=None, return_index=False):
    """
    Final detections of one image from the exported graph's candidates.

    Args:
        boxes (ndarray): (N, 4) float XYXY in input pixels. scores (ndarray): (N,) float. classes: (N,) int.
        params (dict or None): ``postprocess.json``'s ``"postprocess"`` entry (keys of
            ``d2_defects.modeling.postprocess.PostprocessParams``); None: the graph did its own NMS (models
            with Detectron2's stock heads), only the last step below runs.
        input_size (tuple): (height, width) of the image given to the graph.
        output_size (tuple): (height, width) to report boxes in, e.g. the original image's before the test
            resize (default: ``input_size``).
        return_index (bool): also return the candidates' indices (M,), e.g. to select their ``masks``.
    Returns:
        boxes (M, 4), scores (M,), classes (M,): by score (descending); boxes scaled to ``output_size``,
        clipped to it, empty ones dropped (as Detectron2's ``detector_postprocess``).
    """
    boxes, scores, classes = np.asarray(boxes), np.asarray(scores), np.asarray(classes).astype(np.int64)
    index = np.arange(len(boxes))
    if params is not None:
        per_class = params.get("score_thresh_per_class")
        if per_class:
            thresh = np.asarray(per_class, dtype=scores.dtype)[classes]
        else:
            thresh = np.asarray(params["score_thresh"], dtype=scores.dtype)
        cand = np.flatnonzero(scores > thresh)
        boxes, scores, classes, index = boxes[cand], scores[cand], classes[cand], index[cand]
        if params.get("soft_nms"):
            keep, new_scores = soft_nms(boxes, scores, classes, params["soft_nms_method"], params["soft_nms_sigma"],
                                        params["soft_nms_iou_thresh"], params["soft_nms_score_thresh"])
            new_scores = new_scores.astype(scores.dtype)
        else:
            keep = nms(boxes, scores, classes, params["nms_thresh"])
            new_scores = scores[keep]
        k = int(params.get("topk_per_image", -1))
        if k >= 0:
            keep, new_scores = keep[:k], new_scores[:k]
        if params.get("fragment_decay"):
            order, new_scores = fragment_decay(boxes[keep], new_scores, classes[keep], params["fragment_overlap"],
                                               params["fragment_factor"])
            keep = keep[order]
        boxes, scores, classes, index = boxes[keep], new_scores, classes[keep], index[keep]
    out_h, out_w = output_size or input_size
    boxes = boxes.copy()
    if (out_h, out_w) != tuple(input_size):
        boxes[:, 0::2] *= boxes.dtype.type(out_w / input_size[1])
        boxes[:, 1::2] *= boxes.dtype.type(out_h / input_size[0])
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, out_w)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, out_h)
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if return_index:
        return boxes[nonempty], scores[nonempty], classes[nonempty], index[nonempty]
    return boxes[nonempty], scores[nonempty], classes[nonempty]


def _sampling_weights(start, end, box_lo, box_hi, m):
    """(end - start, m) weights of bilinear sampling (``grid_sample``, ``align_corners=False``, zeros outside) of an
    m-cell mask side spread over [box_lo, box_hi], at the pixel centres start + 0.5 ... end - 0.5."""
    centres = np.arange(start, end, dtype=np.float32) + np.float32(0.5)
    g = (centres - np.float32(box_lo)) / np.float32(box_hi - box_lo) * np.float32(2) - np.float32(1)
    pos = ((g + np.float32(1)) * np.float32(m) - np.float32(1)) / np.float32(2)  # in mask cells
    lo = np.floor(pos)
    frac = (pos - lo).astype(np.float32)
    lo = lo.astype(np.int64)
    w = np.zeros((len(centres), m + 2), np.float32)  # columns -1 and m: the zero padding, dropped below
    rows = np.arange(len(centres))
    w[rows, np.clip(lo, -1, m) + 1] += np.float32(1) - frac
    w[rows, np.clip(lo + 1, -1, m) + 1] += frac
    return w[:, 1:-1]


def paste_masks(masks, boxes, image_size, threshold=0.5):
    """
    Image masks from per-box mask probabilities, as Detectron2's ``paste_masks_in_image``: each (M, M) mask is
    stretched over its box, sampled bilinearly at every pixel centre (``grid_sample`` with ``align_corners=False``,
    zero outside the mask) and thresholded (``>= threshold``).

    Args:
        masks (ndarray): (N, M, M) probabilities in [0, 1]. boxes (ndarray): (N, 4) XYXY in image pixels.
        image_size (tuple): (height, width).
    Returns:
        ndarray: (N, height, width) bool.
    """
    masks, boxes = np.asarray(masks, np.float32), np.asarray(boxes, np.float32)
    h, w = (int(v) for v in image_size)
    out = np.zeros((len(masks), h, w), bool)
    for i, (mask, (x0, y0, x1, y1)) in enumerate(zip(masks, boxes)):
        m = mask.shape[-1]
        # only pixels within a pixel of the box can sample the mask
        ys, ye = max(0, int(math.floor(y0)) - 1), min(h, int(math.ceil(y1)) + 1)
        xs, xe = max(0, int(math.floor(x0)) - 1), min(w, int(math.ceil(x1)) + 1)
        if ye <= ys or xe <= xs:
            continue
        wy = _sampling_weights(ys, ye, y0, y1, m)
        wx = _sampling_weights(xs, xe, x0, x1, m)
        out[i, ys:ye, xs:xe] = (wy @ mask @ wx.T) >= threshold
    return out
