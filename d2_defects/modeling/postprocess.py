"""Box postprocessing shared by the project's heads (ROI heads, cascade, FCOS, TTA merge).

``detection_inference`` is a drop-in for Detectron2's ``fast_rcnn_inference`` that takes its options from
:class:`PostprocessParams` (built from the config), so that every head postprocesses the same way.
"""
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from detectron2.layers import batched_nms
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference

__all__ = ["PostprocessParams", "detection_inference", "select_detections"]


@dataclass
class PostprocessParams:
    score_thresh: float = 0.05  # scores below are dropped before NMS
    nms_thresh: float = 0.5  # IoU threshold of hard NMS
    topk_per_image: int = 100  # detections kept per image (TEST.DETECTIONS_PER_IMAGE)
    score_thresh_per_class: Optional[List[float]] = field(default=None)  # overrides score_thresh per class

    @classmethod
    def from_config(cls, cfg):
        return cls(
            score_thresh=cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
            nms_thresh=cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
            topk_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
        )


def detection_inference(boxes, scores, image_shapes, params: PostprocessParams):
    """
    Same contract as ``detectron2.modeling.roi_heads.fast_rcnn.fast_rcnn_inference``.

    Args:
        boxes (list[Tensor]): per image, (R, K*4) or (R, 4) predicted boxes, XYXY absolute.
        scores (list[Tensor]): per image, (R, K+1) class scores (last column: background).
        image_shapes (list[tuple]): per image (height, width).
        params (PostprocessParams)
    Returns:
        list[Instances], list[Tensor]: detections and the indices of the kept proposals, per image.
    """
    return fast_rcnn_inference(
        boxes, scores, image_shapes, params.score_thresh, params.nms_thresh, params.topk_per_image
    )


def select_detections(boxes, scores, classes, params: PostprocessParams):
    """
    Postprocess the candidate detections of ONE image (used by one-stage heads and test-time merges):
    score threshold, NMS per class, top-k.

    Args:
        boxes (Tensor): (N, 4) XYXY absolute.
        scores (Tensor): (N,) scores.
        classes (Tensor): (N,) int64 class ids; boxes of different classes never suppress each other.
        params (PostprocessParams)
    Returns:
        keep (Tensor): (M,) int64 indices into the inputs, sorted by final score (descending).
        final_scores (Tensor): (M,) the scores of the kept detections.
    """
    cand = torch.nonzero(scores > params.score_thresh).squeeze(1)
    keep = batched_nms(boxes[cand], scores[cand], classes[cand], params.nms_thresh)[: params.topk_per_image]
    keep = cand[keep]
    return keep, scores[keep]
