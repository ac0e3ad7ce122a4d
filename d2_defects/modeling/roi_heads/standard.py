"""``DefectStandardROIHeads``: Detectron2's ``StandardROIHeads`` with the project's box predictor
(postprocessing from the config), the optional IoU branch and the OHEM sampler.

With ``IOU_BRANCH.ENABLED: False`` and ``SAMPLER: "random"`` it computes exactly what the stock head computes.
"""
from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads

from .fast_rcnn import DefectFastRCNNOutputLayers
from .iou_branch import IOU_LOSS_TYPES, IoUFastRCNNOutputLayers
from .ohem import SAMPLERS, OHEMSamplerMixin
from ...utils.errors import ConfigError

__all__ = ["DefectStandardROIHeads", "check_roi_heads_config", "build_defect_box_predictor"]

BOX_REG_LOSS_TYPES = ("smooth_l1", "giou", "diou", "ciou")


def check_sampler(sampler):
    """``MODEL.ROI_HEADS.SAMPLER`` (or the heads' ``sampler`` argument) must be one of :data:`SAMPLERS`."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"MODEL.ROI_HEADS.SAMPLER must be one of {SAMPLERS}, got {sampler!r}")
    return sampler


def check_roi_heads_config(cfg, num_stages=1):
    """Raise ``ValueError`` naming the key for a wrong value of the keys the project's ROI heads read."""
    ib = cfg.MODEL.ROI_BOX_HEAD.IOU_BRANCH
    check_sampler(cfg.MODEL.ROI_HEADS.SAMPLER)
    loss_type = cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE
    if loss_type not in BOX_REG_LOSS_TYPES:
        raise ConfigError(f"MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE must be one of {BOX_REG_LOSS_TYPES}, "
                         f"got {loss_type!r}")
    if ib.LOSS_TYPE not in IOU_LOSS_TYPES:
        raise ConfigError(f"MODEL.ROI_BOX_HEAD.IOU_BRANCH.LOSS_TYPE must be one of {IOU_LOSS_TYPES}, "
                         f"got {ib.LOSS_TYPE!r}")
    if not 0.0 <= ib.SCORE_ALPHA <= 1.0:
        raise ConfigError(f"MODEL.ROI_BOX_HEAD.IOU_BRANCH.SCORE_ALPHA must be in [0, 1], got {ib.SCORE_ALPHA}")
    if ib.LOSS_WEIGHT < 0:
        raise ConfigError(f"MODEL.ROI_BOX_HEAD.IOU_BRANCH.LOSS_WEIGHT must be >= 0, got {ib.LOSS_WEIGHT}")
    bad = [s for s in ib.STAGES if not 0 <= s < num_stages]
    if bad:
        raise ConfigError(f"MODEL.ROI_BOX_HEAD.IOU_BRANCH.STAGES: stages {bad} do not exist "
                         f"(the head has {num_stages} stage(s), numbered from 0)")


def iou_branch_stages(cfg, num_stages):
    """Set of the stages (0-based) that get the IoU branch."""
    ib = cfg.MODEL.ROI_BOX_HEAD.IOU_BRANCH
    if not ib.ENABLED:
        return set()
    return set(ib.STAGES) if len(ib.STAGES) else set(range(num_stages))


def build_defect_box_predictor(cfg, input_shape, iou_branch, **kwargs):
    """The box predictor of one stage: with the IoU branch or without; ``kwargs`` override config values."""
    cls = IoUFastRCNNOutputLayers if iou_branch else DefectFastRCNNOutputLayers
    return cls(cfg, input_shape, **kwargs)


@ROI_HEADS_REGISTRY.register()
class DefectStandardROIHeads(OHEMSamplerMixin, StandardROIHeads):
    """
    ``StandardROIHeads`` with:

    - :class:`DefectFastRCNNOutputLayers` as box predictor (or :class:`IoUFastRCNNOutputLayers` when
      ``MODEL.ROI_BOX_HEAD.IOU_BRANCH.ENABLED``; the branch's ``STAGES`` key is for the cascade only);
    - ``MODEL.ROI_HEADS.SAMPLER: "ohem"``: the box head trains on the per-image top-loss proposals.
    """

    @configurable
    def __init__(self, *, sampler: str = "random", **kwargs):
        super().__init__(**kwargs)
        self.sampler = check_sampler(sampler)

    @classmethod
    def from_config(cls, cfg, input_shape):
        check_roi_heads_config(cfg, num_stages=1)
        ret = super().from_config(cfg, input_shape)
        ret["sampler"] = cfg.MODEL.ROI_HEADS.SAMPLER
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = build_defect_box_predictor(
            cfg, ret["box_head"].output_shape, iou_branch=cfg.MODEL.ROI_BOX_HEAD.IOU_BRANCH.ENABLED
        )
        return ret

    def _forward_box(self, features, proposals):
        if self.training and self.sampler == "ohem":
            proposals = self._select_hard_examples(
                [features[f] for f in self.box_in_features], proposals, self.box_head, self.box_predictor
            )
        return super()._forward_box(features, proposals)
