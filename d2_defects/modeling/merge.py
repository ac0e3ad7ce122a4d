"""Merging the detections of several sources of ONE image: test-time augmentations or ensembled models.

``merge_detections`` is shared by :class:`d2_defects.modeling.tta.DefectTTA` and ``tools/ensemble.py``:

- ``"nms"``: scores weighted, all sources concatenated, then the project's postprocessing
  (:func:`d2_defects.modeling.postprocess.select_detections`: score threshold, per-class NMS, top-k);
- ``"soft_nms"``: the same with the postprocessor's soft-NMS switched on;
- ``"wbf"``: weighted boxes fusion (``ensemble_boxes.weighted_boxes_fusion``), then top-k.

Fragment decay (``params.fragment_decay``) runs last in every method, on the merged detections.
"""
import dataclasses

import numpy as np
import torch

from .postprocess import PostprocessParams, select_detections
from ..layers.fragments import fragment_decay
from ..utils.errors import UsageError

__all__ = ["MERGE_METHODS", "merge_detections", "with_soft_nms"]

MERGE_METHODS = ("nms", "soft_nms", "wbf")

def with_soft_nms(params: PostprocessParams):
    """``params`` with the postprocessor's soft-NMS (``d2_defects.layers.soft_nms``) switched on."""
    return dataclasses.replace(params, soft_nms=True)


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
        raise UsageError(f"unknown merge method {method!r}, expected one of {MERGE_METHODS}")
    n = len(boxes)
    if not (n == len(scores) == len(classes)) or n == 0:
        raise ValueError("merge_detections needs the same number (>= 1) of boxes, scores and classes lists")
    weights = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(weights) != n or min(weights) <= 0:
        raise UsageError(f"need {n} positive weights, got {weights}")
    if method == "wbf":
        if sum(len(b) for b in boxes) == 0:
            return boxes[0].new_zeros((0, 4)), scores[0].new_zeros(0), classes[0].new_zeros(0)
        b, s, c = _wbf(boxes, scores, classes, image_size, weights, wbf_iou_thresh, params.score_thresh)
        k = params.topk_per_image
        b, s, c = (b, s, c) if k < 0 else (b[:k], s[:k], c[:k])
        if params.fragment_decay:  # as select_detections does after its top-k
            keep, s = fragment_decay(b, s, c, params.fragment_overlap, params.fragment_factor)
            b, c = b[keep], c[keep]
        return b, s, c

    mean_w = sum(weights) / n
    all_boxes = torch.cat(list(boxes))
    all_scores = torch.cat([s * (wi / mean_w) for s, wi in zip(scores, weights)])
    all_classes = torch.cat(list(classes))
    if method == "soft_nms":
        keep, final = select_detections(all_boxes, all_scores, all_classes, with_soft_nms(params))
    else:
        keep, final = select_detections(all_boxes, all_scores, all_classes, params)
    return all_boxes[keep], final, all_classes[keep]
