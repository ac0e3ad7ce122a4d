"""IoU-prediction branch: a box predictor that also predicts, for each proposal, the IoU of its regressed
box with the matched ground truth, and rescores detections with it (IoU-aware scoring).

Switched on by ``MODEL.ROI_BOX_HEAD.IOU_BRANCH.ENABLED``; see ``_add_roi_heads_config`` for the keys.
"""
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.structures import Boxes
from detectron2.structures.boxes import matched_pairwise_iou
from torch import nn

from ..postprocess import detection_inference
from .fast_rcnn import DefectFastRCNNOutputLayers
from ...utils.errors import ConfigError

__all__ = ["IoUFastRCNNOutputLayers", "rescore_with_iou", "IOU_LOSS_TYPES"]

IOU_LOSS_TYPES = ("bce", "smooth_l1")


def rescore_with_iou(scores, ious, alpha):
    """
    IoU-aware score: ``cls^(1 - alpha) * iou^alpha`` for the foreground columns.

    Args:
        scores (Tensor): (R, K+1) class probabilities (last column: background, left unchanged).
        ious (Tensor): (R,) predicted IoU in [0, 1].
        alpha (float): in [0, 1]; 0 returns ``scores`` unchanged.
    Returns:
        Tensor: (R, K+1).
    """
    if alpha == 0:
        return scores
    out = scores.clone()
    out[:, :-1] = scores[:, :-1].pow(1.0 - alpha) * ious.clamp(min=0.0).unsqueeze(1).pow(alpha)
    return out


class IoUFastRCNNOutputLayers(DefectFastRCNNOutputLayers):
    """
    :class:`DefectFastRCNNOutputLayers` with one more linear layer on the box-head feature that predicts
    the IoU (a logit) between each proposal's regressed box and its matched ground-truth box.

    ``forward`` returns ``(scores, proposal_deltas, iou_logits)``; every method of the parent accepts that
    3-tuple. Training adds ``loss_iou``, computed on the sampled foreground proposals only, with the IoU
    target computed from detached boxes. ``inference`` rescales the class scores with the predicted IoU
    (:func:`rescore_with_iou`) before the project's postprocessing, and stores the predicted IoU of each
    detection in ``pred_ious``.
    """

    @configurable
    def __init__(self, *args, iou_loss_weight: float = 1.0, iou_loss_type: str = "bce",
                 iou_score_alpha: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        if iou_loss_type not in IOU_LOSS_TYPES:
            raise ConfigError(f"MODEL.ROI_BOX_HEAD.IOU_BRANCH.LOSS_TYPE must be one of {IOU_LOSS_TYPES}, "
                             f"got {iou_loss_type!r}")
        self.iou_pred = nn.Linear(self.cls_score.in_features, 1)
        nn.init.normal_(self.iou_pred.weight, std=0.01)
        nn.init.constant_(self.iou_pred.bias, 0.0)
        self.iou_loss_weight = iou_loss_weight
        self.iou_loss_type = iou_loss_type
        self.iou_score_alpha = iou_score_alpha

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ib = cfg.MODEL.ROI_BOX_HEAD.IOU_BRANCH
        ret.update({"iou_loss_weight": ib.LOSS_WEIGHT, "iou_loss_type": ib.LOSS_TYPE,
                    "iou_score_alpha": ib.SCORE_ALPHA})
        return ret

    def forward(self, x):
        scores, proposal_deltas = super().forward(x)
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        return scores, proposal_deltas, self.iou_pred(x).squeeze(1)

    def losses(self, predictions, proposals):
        losses = super().losses(predictions[:2], proposals)
        iou_logits = predictions[2]
        if not len(proposals):
            losses["loss_iou"] = iou_logits.sum() * 0.0
            return losses
        gt_classes = cat([p.gt_classes for p in proposals], dim=0)
        fg = (gt_classes >= 0) & (gt_classes < self.num_classes)
        if not fg.any():
            losses["loss_iou"] = iou_logits.sum() * 0.0
            return losses
        with torch.no_grad():
            pred_boxes = cat(self.predict_boxes_for_gt_classes(predictions, proposals), dim=0)
            gt_boxes = cat([(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor
                            for p in proposals], dim=0)
            target = matched_pairwise_iou(Boxes(pred_boxes[fg]), Boxes(gt_boxes[fg])).clamp(0.0, 1.0)
        logits = iou_logits[fg]
        if self.iou_loss_type == "bce":
            loss = F.binary_cross_entropy_with_logits(logits, target, reduction="mean")
        else:
            loss = F.smooth_l1_loss(logits.sigmoid(), target, beta=0.1, reduction="mean")
        losses["loss_iou"] = loss * self.iou_loss_weight
        return losses

    def predict_ious(self, predictions, proposals):
        """list[Tensor]: per image, (Ri,) predicted IoU in [0, 1] of each proposal's regressed box."""
        return predictions[2].sigmoid().split([len(p) for p in proposals])

    def predict_boxes(self, predictions, proposals):
        return super().predict_boxes(predictions[:2], proposals)

    def predict_boxes_for_gt_classes(self, predictions, proposals):
        return super().predict_boxes_for_gt_classes(predictions[:2], proposals)

    def predict_probs(self, predictions, proposals):
        return super().predict_probs(predictions[:2], proposals)

    def inference(self, predictions, proposals):
        boxes = self.predict_boxes(predictions, proposals)
        ious = self.predict_ious(predictions, proposals)
        scores = [rescore_with_iou(s, i, self.iou_score_alpha)
                  for s, i in zip(self.predict_probs(predictions, proposals), ious)]
        image_shapes = [x.image_size for x in proposals]
        instances, kept = detection_inference(boxes, scores, image_shapes, self.postprocess)
        attach_pred_ious(instances, kept, ious)
        return instances, kept


def attach_pred_ious(instances, kept, ious):
    """Set ``pred_ious`` (predicted IoU of each detection) from the kept proposal indices."""
    for inst, k, iou in zip(instances, kept, ious):
        inst.pred_ious = iou[k]
