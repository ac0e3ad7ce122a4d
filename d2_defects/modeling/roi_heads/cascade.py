"""``DefectCascadeROIHeads``: Detectron2's ``CascadeROIHeads`` with any number of stages (from
``MODEL.ROI_BOX_CASCADE_HEAD.IOUS`` / ``BBOX_REG_WEIGHTS``), weighted per-stage scores, the IoU branch on
chosen stages, the OHEM sampler and the project's postprocessing.

With the IoU branch off, ``STAGE_SCORE_WEIGHTS: []`` and ``SAMPLER: "random"`` it computes exactly what the
stock head computes.
"""
from typing import List

from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads

from ..postprocess import detection_inference
from .iou_branch import attach_pred_ious, rescore_with_iou
from .ohem import OHEMSamplerMixin
from .standard import build_defect_box_predictor, check_roi_heads_config, check_sampler, iou_branch_stages
from ...utils.errors import ConfigError

__all__ = ["DefectCascadeROIHeads", "check_cascade_config"]


def check_cascade_config(cfg):
    """Raise ``ValueError`` naming the key when the cascade keys disagree; return the number of stages."""
    ch = cfg.MODEL.ROI_BOX_CASCADE_HEAD
    ious, weights, stage_w = list(ch.IOUS), list(ch.BBOX_REG_WEIGHTS), list(ch.STAGE_SCORE_WEIGHTS)
    if not ious:
        raise ConfigError("MODEL.ROI_BOX_CASCADE_HEAD.IOUS must name at least one stage")
    if len(weights) != len(ious):
        raise ConfigError(
            f"MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS has {len(weights)} entries but "
            f"MODEL.ROI_BOX_CASCADE_HEAD.IOUS has {len(ious)}: give one (wx, wy, ww, wh) per stage"
        )
    if any(len(w) != 4 for w in weights):
        raise ConfigError("MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS: each stage needs 4 weights (wx, wy, ww, wh)")
    if ious[0] != cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS[0]:
        raise ConfigError(f"MODEL.ROI_BOX_CASCADE_HEAD.IOUS[0] ({ious[0]}) must equal "
                         f"MODEL.ROI_HEADS.IOU_THRESHOLDS[0] ({cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS[0]})")
    if stage_w and (len(stage_w) != len(ious) or min(stage_w) < 0 or sum(stage_w) <= 0):
        raise ConfigError(f"MODEL.ROI_BOX_CASCADE_HEAD.STAGE_SCORE_WEIGHTS must be empty or {len(ious)} "
                         f"non-negative numbers with a positive sum (one per stage), got {stage_w}")
    if not cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG:
        raise ConfigError("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG must be True for cascade heads")
    return len(ious)


@ROI_HEADS_REGISTRY.register()
class DefectCascadeROIHeads(OHEMSamplerMixin, CascadeROIHeads):
    """
    ``CascadeROIHeads`` whose stages use :class:`DefectFastRCNNOutputLayers` (or
    :class:`IoUFastRCNNOutputLayers` for the stages in ``IOU_BRANCH.STAGES``). At inference the class scores
    of the stages are averaged with ``STAGE_SCORE_WEIGHTS`` (empty: plain mean), rescaled by the IoU predicted
    by the last stage that has the IoU branch, and postprocessed by :func:`detection_inference`.
    OHEM (``SAMPLER: "ohem"``) selects the first stage's training proposals; the later stages refine them.
    """

    @configurable
    def __init__(self, *, stage_score_weights: List[float] = (), sampler: str = "random", **kwargs):
        super().__init__(**kwargs)
        self.sampler = check_sampler(sampler)
        self.stage_score_weights = list(stage_score_weights)

    @classmethod
    def from_config(cls, cfg, input_shape):
        num_stages = check_cascade_config(cfg)
        check_roi_heads_config(cfg, num_stages=num_stages)
        ret = super().from_config(cfg, input_shape)
        ret.update({"stage_score_weights": cfg.MODEL.ROI_BOX_CASCADE_HEAD.STAGE_SCORE_WEIGHTS,
                    "sampler": cfg.MODEL.ROI_HEADS.SAMPLER})
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        stages = iou_branch_stages(cfg, len(ret["box_heads"]))
        ret["box_predictors"] = [
            build_defect_box_predictor(cfg, head.output_shape, iou_branch=k in stages,
                                       box2box_transform=stock.box2box_transform)
            for k, (head, stock) in enumerate(zip(ret["box_heads"], ret["box_predictors"]))
        ]
        return ret

    def _forward_box(self, features, proposals, targets=None):
        if self.training:
            if self.sampler == "ohem":
                proposals = self._select_hard_examples(
                    [features[f] for f in self.box_in_features], proposals, self.box_head[0], self.box_predictor[0]
                )
            return super()._forward_box(features, proposals, targets)

        # Inference, restated from CascadeROIHeads._forward_box (detectron2 a59f056) to weight the stage
        # scores, rescore with the IoU branch and use the project's postprocessing.
        features = [features[f] for f in self.box_in_features]
        image_sizes = [x.image_size for x in proposals]
        head_outputs, prev_pred_boxes = [], None
        for k in range(self.num_cascade_stages):
            if k > 0:
                proposals = self._create_proposals_from_boxes(prev_pred_boxes, image_sizes)
            predictions = self._run_stage(features, proposals, k)
            prev_pred_boxes = self.box_predictor[k].predict_boxes(predictions, proposals)
            head_outputs.append((self.box_predictor[k], predictions, proposals))

        scores_per_stage = [h[0].predict_probs(h[1], h[2]) for h in head_outputs]
        if self.stage_score_weights:
            w = [x / sum(self.stage_score_weights) for x in self.stage_score_weights]
            scores = [sum(wk * s for wk, s in zip(w, per_image)) for per_image in zip(*scores_per_stage)]
        else:  # the stock head's plain mean, same arithmetic
            scores = [sum(list(per_image)) * (1.0 / self.num_cascade_stages) for per_image in zip(*scores_per_stage)]

        ious = None
        iou_stages = [h for h in head_outputs if hasattr(h[0], "predict_ious")]
        if iou_stages:
            predictor, predictions, stage_proposals = iou_stages[-1]
            ious = predictor.predict_ious(predictions, stage_proposals)
            scores = [rescore_with_iou(s, i, predictor.iou_score_alpha) for s, i in zip(scores, ious)]

        predictor, predictions, proposals = head_outputs[-1]
        boxes = predictor.predict_boxes(predictions, proposals)
        pred_instances, kept = detection_inference(boxes, scores, image_sizes, predictor.postprocess)
        if ious is not None:
            attach_pred_ious(pred_instances, kept, ious)
        return pred_instances
