"""FCOS as a registered, yacs-configured meta-architecture.

Detectron2 ships :class:`detectron2.modeling.meta_arch.fcos.FCOS` only for LazyConfig (not in
``META_ARCH_REGISTRY``, no ``from_config``). :class:`DefectFCOS` subclasses it and adds:

- ``from_config`` reading ``MODEL.FCOS.*`` (head built from Detectron2's ``FCOSHead``);
- a configurable box loss (``BOX_LOSS_TYPE``) and an IoU-quality branch (``QUALITY_BRANCH: "iou"``: the
  centerness conv learns the IoU of its predicted box with the matched ground truth instead);
- postprocessing through :func:`d2_defects.modeling.postprocess.select_detections`, so the project's NMS
  options (soft-NMS, per-class thresholds) apply to FCOS as to the R-CNN heads.
"""
import dataclasses

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.box_regression import _dense_box_regression_loss
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead
from detectron2.structures import Boxes
from detectron2.structures.boxes import matched_pairwise_iou
from torch.nn import functional as F

from ..postprocess import PostprocessParams, select_detections
from ...utils.errors import ConfigError

__all__ = ["DefectFCOS"]

BOX_LOSS_TYPES = ("giou", "diou", "ciou", "smooth_l1")
QUALITY_BRANCHES = ("centerness", "iou")


@META_ARCH_REGISTRY.register()
class DefectFCOS(FCOS):
    """
    Detectron2's FCOS built from ``MODEL.FCOS.*``. Losses: ``loss_fcos_cls`` (focal), ``loss_fcos_loc``
    (``BOX_LOSS_TYPE``), ``loss_fcos_ctr`` (centerness) or ``loss_fcos_iou`` (IoU quality).
    """

    @configurable
    def __init__(
        self,
        *,
        box_reg_loss_type: str = "giou",
        quality_branch: str = "centerness",
        postprocess_params: PostprocessParams = None,
        **kwargs,
    ):
        """
        Args:
            box_reg_loss_type: one of ``BOX_LOSS_TYPES``.
            quality_branch: "centerness" (upstream) or "iou".
            postprocess_params: NMS/threshold/top-k options for :func:`select_detections`; default: built from
                upstream's ``test_score_thresh``/``test_nms_thresh``/``max_detections_per_image``.
            kwargs: arguments of :class:`FCOS`.
        """
        super().__init__(**kwargs)
        if box_reg_loss_type not in BOX_LOSS_TYPES:
            raise ConfigError(f"MODEL.FCOS.BOX_LOSS_TYPE must be one of {BOX_LOSS_TYPES}, got {box_reg_loss_type!r}")
        if quality_branch not in QUALITY_BRANCHES:
            raise ConfigError(f"MODEL.FCOS.QUALITY_BRANCH must be one of {QUALITY_BRANCHES}, got {quality_branch!r}")
        self.box_reg_loss_type = box_reg_loss_type
        self.quality_branch = quality_branch
        if postprocess_params is None:
            postprocess_params = PostprocessParams(
                score_thresh=self.test_score_thresh,
                nms_thresh=self.test_nms_thresh,
                topk_per_image=self.max_detections_per_image,
            )
        self.postprocess_params = postprocess_params
        # candidates are pre-filtered at the lowest threshold that select_detections may still accept (the
        # per-class thresholds replace score_thresh when given)
        self.test_score_thresh = min(postprocess_params.score_thresh_per_class or [postprocess_params.score_thresh])

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.FCOS
        if c.NUM_CLASSES < 1:
            raise ConfigError(f"MODEL.FCOS.NUM_CLASSES must be >= 1, got {c.NUM_CLASSES}")
        if c.NUM_CONVS < 0:
            raise ConfigError(f"MODEL.FCOS.NUM_CONVS must be >= 0, got {c.NUM_CONVS}")
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in c.IN_FEATURES if f not in shapes]
        if missing or not c.IN_FEATURES:
            raise ConfigError(f"MODEL.FCOS.IN_FEATURES: {missing or '[]'} not in the backbone outputs {sorted(shapes)}")
        feature_shapes = [shapes[f] for f in c.IN_FEATURES]
        channels = {s.channels for s in feature_shapes}
        if len(channels) != 1:
            raise ConfigError(f"MODEL.FCOS.IN_FEATURES must have equal channels (an FPN), got {channels}")
        head = FCOSHead(
            input_shape=feature_shapes,
            conv_dims=[channels.pop()] * c.NUM_CONVS,
            num_classes=c.NUM_CLASSES,
            norm=c.HEAD_NORM,
            prior_prob=c.PRIOR_PROB,
        )
        # start from the project's postprocess settings (soft-NMS etc.) and take FCOS's own thresholds;
        # SCORE_THRESH_PER_CLASS must have one value per FCOS class (not per ROI_HEADS class)
        params = dataclasses.replace(
            PostprocessParams.from_config(cfg, num_classes=c.NUM_CLASSES),
            score_thresh=c.SCORE_THRESH_TEST,
            nms_thresh=c.NMS_THRESH_TEST,
            topk_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": list(c.IN_FEATURES),
            "num_classes": c.NUM_CLASSES,
            "center_sampling_radius": c.CENTER_SAMPLING_RADIUS,
            "focal_loss_alpha": c.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": c.FOCAL_LOSS_GAMMA,
            "test_score_thresh": c.SCORE_THRESH_TEST,
            "test_topk_candidates": c.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": c.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "box_reg_loss_type": c.BOX_LOSS_TYPE,
            "quality_branch": c.QUALITY_BRANCH,
            "postprocess_params": params,
        }

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, pred_centerness):
        """Upstream losses; the box loss and the quality loss are replaced when configured otherwise."""
        losses = super().losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, pred_centerness)
        if self.box_reg_loss_type == "giou" and self.quality_branch == "centerness":
            return losses
        normalizer = self.loss_normalizer  # the value upstream just used (EMA of the positives)
        pos_mask = torch.stack(gt_labels) != self.num_classes  # (N, R); upstream has no ignored anchors
        if self.box_reg_loss_type != "giou":
            losses["loss_fcos_loc"] = _dense_box_regression_loss(
                anchors, self.box2box_transform, pred_anchor_deltas, gt_boxes, pos_mask,
                box_reg_loss_type=self.box_reg_loss_type,
            ) / normalizer
        if self.quality_branch == "iou":
            del losses["loss_fcos_ctr"]
            anchors_all = Boxes.cat(anchors).tensor  # (R, 4)
            deltas = torch.cat(pred_anchor_deltas, dim=1)  # (N, R, 4)
            idx_img, idx_anchor = torch.nonzero(pos_mask, as_tuple=True)
            with torch.no_grad():
                pred_boxes = self.box2box_transform.apply_deltas(deltas[idx_img, idx_anchor], anchors_all[idx_anchor])
                target = matched_pairwise_iou(Boxes(pred_boxes), Boxes(torch.stack(gt_boxes)[idx_img, idx_anchor]))
            quality = torch.cat(pred_centerness, dim=1).squeeze(2)[idx_img, idx_anchor]
            losses["loss_fcos_iou"] = (
                F.binary_cross_entropy_with_logits(quality, target.to(quality.dtype), reduction="sum") / normalizer
            )
        return losses

    def inference_single_image(self, anchors, box_cls, box_delta, image_size):
        """Upstream decoding (score threshold, top-k candidates per level), then the project's postprocessing."""
        pred = self._decode_multi_level_predictions(
            anchors, box_cls, box_delta, self.test_score_thresh, self.test_topk_candidates, image_size
        )
        keep, scores = select_detections(pred.pred_boxes.tensor, pred.scores, pred.pred_classes, self.postprocess_params)
        pred = pred[keep]
        pred.scores = scores
        return pred
