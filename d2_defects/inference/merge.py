"""Merging the detections of several sources of ONE image: test-time augmentations or ensembled models.

``merge_detections`` is shared by :class:`d2_defects.modeling.tta.DefectTTA` and ``tools/ensemble.py``:

- ``"nms"``: scores weighted, all sources concatenated, then the project's postprocessing
  (:func:`d2_defects.modeling.postprocess.select_detections`: score threshold, per-class NMS, top-k);
- ``"soft_nms"``: the same with the postprocessor's soft-NMS switched on;
- ``"wbf"``: weighted boxes fusion (``ensemble_boxes.weighted_boxes_fusion``), then top-k.
"""
import dataclasses

import numpy as np
import torch
from detectron2.structures import Boxes, pairwise_iou

from ..modeling.postprocess import PostprocessParams, select_detections

__all__ = ["MERGE_METHODS", "merge_detections", "with_soft_nms"]

MERGE_METHODS = ("nms", "soft_nms", "wbf")

# Names a PostprocessParams may use for its soft-NMS switch (bool field).
_SOFT_NMS_FLAGS = ("soft_nms_enabled", "soft_nms", "use_soft_nms")


def with_soft_nms(params: PostprocessParams):
    """
    ``params`` with soft-NMS switched on, or ``None`` when the postprocessor has no soft-NMS switch
    (then :func:`merge_detections` uses a small linear soft-NMS of its own).
    """
    names = {f.name for f in dataclasses.fields(params)}
    for flag in _SOFT_NMS_FLAGS:
        if flag in names and isinstance(getattr(params, flag), bool):
            return dataclasses.replace(params, **{flag: True})
    return None


def _soft_nms_fallback(boxes, scores, classes, params, iou_threshold=0.5, prune=0.001):
    """
    Linear soft-NMS (Bodla et al. 2017) per class, for postprocessors without soft-NMS: a box's score is
    multiplied by ``1 - IoU`` with every higher-scoring kept box it overlaps by more than ``iou_threshold``;
    boxes falling below ``prune`` are dropped. One Python step per kept box: fine for merges of a few
    hundred boxes.
    """
    cand = torch.nonzero(scores > params.score_thresh).squeeze(1)
    boxes, scores, classes = boxes[cand], scores[cand].clone(), classes[cand]
    iou = pairwise_iou(Boxes(boxes), Boxes(boxes))
    iou[classes[:, None] != classes[None, :]] = 0
    alive = torch.ones(len(cand), dtype=torch.bool, device=boxes.device)
    keep, kept_scores = [], []
    while bool(alive.any()):
        i = int(torch.where(alive, scores, scores.new_tensor(-1.0)).argmax())
        keep.append(i)
        kept_scores.append(scores[i].clone())
        alive[i] = False
        ov = iou[i]
        decay = torch.where(ov > iou_threshold, 1 - ov, torch.ones_like(ov))
        scores = torch.where(alive, scores * decay, scores)
        alive &= scores >= prune
        if len(keep) >= params.topk_per_image:
            break
    keep = torch.as_tensor(keep, dtype=torch.int64, device=boxes.device)
    final = torch.stack(kept_scores) if kept_scores else scores.new_zeros(0)
    return cand[keep], final


def _wbf(boxes, scores, classes, image_size, weights, iou_thresh, score_thresh):
    from ensemble_boxes import weighted_boxes_fusion

    h, w = image_size
    scale = np.array([w, h, w, h], dtype=np.float64)
    device = boxes[0].device
    b_list = [np.clip(b.detach().cpu().double().numpy() / scale, 0, 1) for b in boxes]
    out_b, out_s, out_c = weighted_boxes_fusion(
        b_list, [s.detach().cpu().double().numpy() for s in scores],
        [c.detach().cpu().numpy() for c in classes], weights=list(weights), iou_thr=iou_thresh,
        skip_box_thr=score_thresh,
    )
    return (
        torch.as_tensor(out_b * scale, dtype=torch.float32, device=device).reshape(-1, 4),
        torch.as_tensor(out_s, dtype=torch.float32, device=device),
        torch.as_tensor(out_c, device=device).round().long(),
    )


def merge_detections(boxes, scores, classes, image_size, method, params: PostprocessParams, weights=None,
                     wbf_iou_thresh=0.55):
    """
    Merge the detections that several sources made on one image.

    Args:
        boxes (list[Tensor]): per source, (N_i, 4) XYXY absolute in the image's coordinates.
        scores (list[Tensor]): per source, (N_i,).
        classes (list[Tensor]): per source, (N_i,) int64 contiguous class ids.
        image_size (tuple): (height, width) of the image; "wbf" normalises coordinates by it.
        method (str): one of :data:`MERGE_METHODS`.
        params (PostprocessParams): score threshold, NMS IoU, detections kept per image.
        weights (list[float] or None): per source; scores of source i are multiplied by
            ``weights[i] / mean(weights)`` ("nms", "soft_nms") or fused with these weights ("wbf").
        wbf_iou_thresh (float): IoU above which "wbf" fuses two boxes of one class.
    Returns:
        boxes (Tensor): (M, 4), scores (Tensor): (M,), classes (Tensor): (M,) int64, sorted by score
        (descending), at most ``params.topk_per_image``.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}, expected one of {MERGE_METHODS}")
    n = len(boxes)
    if not (n == len(scores) == len(classes)) or n == 0:
        raise ValueError("merge_detections needs the same number (>= 1) of boxes, scores and classes lists")
    weights = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(weights) != n or min(weights) <= 0:
        raise ValueError(f"need {n} positive weights, got {weights}")
    if method == "wbf":
        if sum(len(b) for b in boxes) == 0:
            return boxes[0].new_zeros((0, 4)), scores[0].new_zeros(0), classes[0].new_zeros(0)
        b, s, c = _wbf(boxes, scores, classes, image_size, weights, wbf_iou_thresh, params.score_thresh)
        k = params.topk_per_image
        return b[:k], s[:k], c[:k]

    mean_w = sum(weights) / n
    all_boxes = torch.cat(list(boxes))
    all_scores = torch.cat([s * (wi / mean_w) for s, wi in zip(scores, weights)])
    all_classes = torch.cat(list(classes))
    if method == "soft_nms":
        soft = with_soft_nms(params)
        if soft is None:
            keep, final = _soft_nms_fallback(all_boxes, all_scores, all_classes, params)
        else:
            keep, final = select_detections(all_boxes, all_scores, all_classes, soft)
    else:
        keep, final = select_detections(all_boxes, all_scores, all_classes, params)
    return all_boxes[keep], final, all_classes[keep]
