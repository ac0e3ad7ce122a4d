"""Box postprocessing shared by the project's heads (ROI heads, cascade, FCOS, TTA merge).

``detection_inference`` is a drop-in for Detectron2's ``fast_rcnn_inference`` that takes its options from
:class:`PostprocessParams` (built from the config), so that every head postprocesses the same way:
per-class score thresholds (``MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS``), then hard NMS or soft-NMS
(``MODEL.SOFT_NMS.*``) per class, then the top ``TEST.DETECTIONS_PER_IMAGE``, then (``MODEL.FRAGMENT_DECAY.*``)
the scores of fragments, detections lying inside a larger and higher-scoring one of their class, decayed.
"""
import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances

from ..layers.fragments import fragment_decay
from ..layers.soft_nms import SOFT_NMS_METHODS, batched_soft_nms
from ..utils.errors import ConfigError

__all__ = [
    "PostprocessParams", "detection_inference", "select_detections", "uses_project_postprocess",
    "check_postprocess_keys_used", "replaced_postprocess", "views_postprocess",
]


@dataclass
class PostprocessParams:
    score_thresh: float = 0.05  # scores below are dropped before NMS
    nms_thresh: float = 0.5  # IoU threshold of hard NMS
    topk_per_image: int = 100  # detections kept per image (TEST.DETECTIONS_PER_IMAGE); < 0: all
    score_thresh_per_class: Optional[List[float]] = field(default=None)  # overrides score_thresh per class
    soft_nms: bool = False  # use batched_soft_nms instead of hard NMS
    soft_nms_method: str = "linear"  # "linear", "gaussian" or "hard"
    soft_nms_sigma: float = 0.5  # gaussian parameter
    soft_nms_iou_thresh: float = 0.5  # IoU above which "linear" decays / "hard" suppresses
    soft_nms_score_thresh: float = 0.001  # decayed scores below are dropped
    fragment_decay: bool = False  # decay fragments after the top-k cut (d2_defects.layers.fragments)
    fragment_overlap: float = 0.6  # a fragment has this fraction of its area inside the larger detection
    fragment_factor: float = 0.5  # fragments' scores are multiplied by it (0: dropped)
    # export only: return every candidate above the score thresholds; NMS / soft-NMS and top-k then run after
    # the exported graph (d2_defects/inference/deploy_postprocess.py)
    defer_nms: bool = False

    @classmethod
    def from_config(cls, cfg, num_classes: Optional[int] = None):
        """
        Args:
            cfg (CfgNode): with the keys of ``add_defects_config``.
            num_classes (int): K, the length ``MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS`` must have
                (default ``MODEL.ROI_HEADS.NUM_CLASSES``; one-stage heads pass their own).
        Raises:
            ValueError: naming the config key, for a wrong per-class list length or bad soft-NMS settings.
        """
        k = cfg.MODEL.ROI_HEADS.NUM_CLASSES if num_classes is None else num_classes
        per_class = [float(x) for x in cfg.MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS]
        if per_class and len(per_class) != k:
            raise ConfigError(
                f"MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS has {len(per_class)} values but the model has "
                f"K={k} classes (give K floats, or [] to use MODEL.ROI_HEADS.SCORE_THRESH_TEST for all)"
            )
        if not all(math.isfinite(x) for x in per_class):
            raise ConfigError(f"MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS must be finite numbers, got {per_class}")
        sn = cfg.MODEL.SOFT_NMS
        if sn.METHOD not in SOFT_NMS_METHODS:
            raise ConfigError(f"MODEL.SOFT_NMS.METHOD must be one of {sorted(SOFT_NMS_METHODS)}, got {sn.METHOD!r}")
        if not (math.isfinite(sn.SIGMA) and sn.SIGMA > 0):
            raise ConfigError(f"MODEL.SOFT_NMS.SIGMA must be > 0, got {sn.SIGMA}")
        if not 0.0 <= sn.IOU_THRESHOLD <= 1.0:
            raise ConfigError(f"MODEL.SOFT_NMS.IOU_THRESHOLD must be in [0, 1], got {sn.IOU_THRESHOLD}")
        if not (math.isfinite(sn.SCORE_THRESHOLD) and sn.SCORE_THRESHOLD >= 0):
            raise ConfigError(f"MODEL.SOFT_NMS.SCORE_THRESHOLD must be >= 0, got {sn.SCORE_THRESHOLD}")
        fd = cfg.MODEL.FRAGMENT_DECAY
        if not (math.isfinite(fd.OVERLAP) and 0.0 < fd.OVERLAP <= 1.0):
            raise ConfigError(f"MODEL.FRAGMENT_DECAY.OVERLAP must be in (0, 1], got {fd.OVERLAP}")
        if not (math.isfinite(fd.FACTOR) and 0.0 <= fd.FACTOR < 1.0):
            raise ConfigError(f"MODEL.FRAGMENT_DECAY.FACTOR must be in [0, 1), got {fd.FACTOR}")
        return cls(
            score_thresh=cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
            nms_thresh=cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
            topk_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            score_thresh_per_class=per_class or None,
            soft_nms=bool(sn.ENABLED),
            soft_nms_method=sn.METHOD,
            soft_nms_sigma=float(sn.SIGMA),
            soft_nms_iou_thresh=float(sn.IOU_THRESHOLD),
            soft_nms_score_thresh=float(sn.SCORE_THRESHOLD),
            fragment_decay=bool(fd.ENABLED),
            fragment_overlap=float(fd.OVERLAP),
            fragment_factor=float(fd.FACTOR),
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
    results = [_detection_inference_single_image(b, s, hw, params) for b, s, hw in zip(boxes, scores, image_shapes)]
    return [r[0] for r in results], [r[1] for r in results]


def _detection_inference_single_image(boxes, scores, image_shape, params):
    # Preserves detectron2 a59f056 `fast_rcnn_inference_single_image`: proposals with a non-finite box or
    # score are dropped; the background column is dropped; boxes are clipped to the image; (R, K*4)
    # class-specific or (R, 4) class-agnostic layout; candidates in (proposal, class) row-major order, so hard
    # NMS gets the same inputs and returns the same detections. One deliberate difference: the returned
    # proposal indices point into the inputs also when proposals were dropped (upstream: into the rest).
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    proposal_ids = torch.arange(len(boxes), device=boxes.device)
    if not valid.all():
        boxes, scores, proposal_ids = boxes[valid], scores[valid], proposal_ids[valid]
    scores = scores[:, :-1]
    num_props, num_classes = scores.shape
    num_bbox_reg_classes = boxes.shape[1] // 4  # K, or 1 for class-agnostic regression
    boxes = Boxes(boxes.reshape(-1, 4))
    boxes.clip(image_shape)
    boxes = boxes.tensor.view(num_props, num_bbox_reg_classes, 4).expand(num_props, num_classes, 4)
    classes = torch.arange(num_classes, device=scores.device).expand(num_props, num_classes)

    keep, final_scores = select_detections(
        boxes.reshape(-1, 4), scores.reshape(-1), classes.reshape(-1), params
    )
    result = Instances(image_shape)
    result.pred_boxes = Boxes(boxes.reshape(-1, 4)[keep])
    result.scores = final_scores
    result.pred_classes = keep % num_classes
    return result, proposal_ids[torch.div(keep, num_classes, rounding_mode="floor")]


def select_detections(boxes, scores, classes, params: PostprocessParams):
    """
    Postprocess the candidate detections of ONE image (used by one-stage heads and test-time merges):
    score threshold (per class if given), NMS or soft-NMS per class, top-k, fragment decay (if enabled).

    Args:
        boxes (Tensor): (N, 4) XYXY absolute.
        scores (Tensor): (N,) scores.
        classes (Tensor): (N,) int64 class ids; boxes of different classes never suppress each other.
        params (PostprocessParams)
    Returns:
        keep (Tensor): (M,) int64 indices into the inputs, sorted by final score (descending).
        final_scores (Tensor): (M,) the scores of the kept detections (decayed by soft-NMS if enabled).
    """
    if params.score_thresh_per_class:
        thresh = torch.as_tensor(params.score_thresh_per_class, dtype=scores.dtype, device=scores.device)
        cand = torch.nonzero(scores > thresh[classes]).squeeze(1)
    else:
        cand = torch.nonzero(scores > params.score_thresh).squeeze(1)
    boxes, scores, classes = boxes[cand], scores[cand], classes[cand]
    if params.defer_nms:
        return cand, scores
    if params.soft_nms:
        keep, final_scores = batched_soft_nms(
            boxes, scores, classes, method=params.soft_nms_method, sigma=params.soft_nms_sigma,
            iou_threshold=params.soft_nms_iou_thresh, score_threshold=params.soft_nms_score_thresh,
        )
    else:
        keep = batched_nms(boxes, scores, classes, params.nms_thresh)
        final_scores = scores[keep]
    if params.topk_per_image >= 0:
        keep, final_scores = keep[: params.topk_per_image], final_scores[: params.topk_per_image]
    if params.fragment_decay:
        order, final_scores = fragment_decay(boxes[keep], final_scores, classes[keep],
                                             params.fragment_overlap, params.fragment_factor)
        keep = keep[order]
    return cand[keep], final_scores


@contextlib.contextmanager
def replaced_postprocess(model, **changes):
    """
    Within the block, every :class:`PostprocessParams` held by the modules of ``model`` (box predictors,
    DefectFCOS) has the fields ``changes`` (``dataclasses.replace``). A model that is not an ``nn.Module`` but
    has a ``replaced_postprocess(**changes)`` context manager of its own (an exported model behind
    ``d2_defects.inference.export.ExportedDetector``) uses it. Yields the original params (one per holder).
    """
    if not isinstance(model, torch.nn.Module):
        own = getattr(model, "replaced_postprocess", None)
        if own is None:
            yield []
        else:
            with own(**changes) as original:
                yield original
        return
    swapped = [(m, k, v) for m in model.modules() for k, v in list(vars(m).items())
               if isinstance(v, PostprocessParams)]
    try:
        for m, k, v in swapped:
            setattr(m, k, dataclasses.replace(v, **changes))
        yield [v for _, _, v in swapped]
    finally:
        for m, k, v in swapped:
            setattr(m, k, v)


def views_postprocess(model, params: PostprocessParams, num_views: int):
    """
    Context for running ``model`` on the ``num_views`` views (test-time augmentations, tiles) of one image whose
    detections are then merged with ``params``: fragment decay acts once, on the merged detections, so it is
    switched off in the views' own postprocessing when there are several views.
    """
    if params.fragment_decay and num_views > 1:
        return replaced_postprocess(model, fragment_decay=False)
    return contextlib.nullcontext()


def uses_project_postprocess(model):
    """True if a module of ``model`` holds :class:`PostprocessParams`, i.e. postprocesses with this module
    (the project's box predictors and one-stage heads keep them as an attribute)."""
    return any(isinstance(v, PostprocessParams) for m in model.modules() for v in vars(m).values())


def check_postprocess_keys_used(cfg, model):
    """
    Raise a ValueError naming the keys when ``MODEL.SOFT_NMS.ENABLED`` or a non-empty
    ``MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS`` is set but ``model`` has no project postprocessing (e.g.
    Detectron2's stock ``StandardROIHeads`` / ``CascadeROIHeads``), which would silently ignore them.
    """
    keys = []
    if cfg.MODEL.SOFT_NMS.ENABLED:
        keys.append("MODEL.SOFT_NMS.ENABLED")
    if len(cfg.MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS):
        keys.append("MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS")
    if cfg.MODEL.FRAGMENT_DECAY.ENABLED:
        keys.append("MODEL.FRAGMENT_DECAY.ENABLED")
    if keys and not uses_project_postprocess(model):
        raise ConfigError(
            f"config error: {' and '.join(keys)} would be ignored: the model ({cfg.MODEL.META_ARCHITECTURE}, "
            f"MODEL.ROI_HEADS.NAME {cfg.MODEL.ROI_HEADS.NAME}) has no d2_defects postprocessing; use the "
            "project's heads (DefectStandardROIHeads, DefectCascadeROIHeads, DefectFCOS) or unset the key"
        )
