"""Config keys added by d2_defects.

``add_defects_config(cfg)`` adds every key this project uses, each under a clearly named node with a
one-line comment.  Keys are only *added*; a YAML file or command-line option naming a key that does not
exist still fails with Detectron2's usual ``KeyError: 'Non-existent config key: ...'``.
"""
import torch
from detectron2.config import CfgNode as CN


def add_defects_config(cfg):
    """
    Add the d2_defects keys to a Detectron2 config (in place) and return it.

    Args:
        cfg (CfgNode): usually ``detectron2.config.get_cfg()``.
    """
    # Device: the code is device-agnostic; default to CUDA when present, else CPU.
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    _add_roi_heads_config(cfg)

    return cfg


def _add_roi_heads_config(cfg):
    """Keys of ``DefectStandardROIHeads`` / ``DefectCascadeROIHeads`` (checked when the heads are built)."""
    # per-stage weights of the class scores at inference (one per cascade stage); empty = plain mean
    cfg.MODEL.ROI_BOX_CASCADE_HEAD.STAGE_SCORE_WEIGHTS = []
    cfg.MODEL.ROI_BOX_HEAD.IOU_BRANCH = CN()
    # predict the IoU of each regressed box with its ground truth and rescore detections with it
    cfg.MODEL.ROI_BOX_HEAD.IOU_BRANCH.ENABLED = False
    # weight of the IoU loss (logged as loss_iou, loss_iou_stage{k} in the cascade)
    cfg.MODEL.ROI_BOX_HEAD.IOU_BRANCH.LOSS_WEIGHT = 1.0
    # "bce" (BCE on the IoU logit, soft target) or "smooth_l1" (on sigmoid(logit))
    cfg.MODEL.ROI_BOX_HEAD.IOU_BRANCH.LOSS_TYPE = "bce"
    # final score = cls^(1 - alpha) * iou^alpha, alpha in [0, 1] (0 = class score only)
    cfg.MODEL.ROI_BOX_HEAD.IOU_BRANCH.SCORE_ALPHA = 0.5
    # cascade stages (0-based) that get the branch; empty = all stages
    cfg.MODEL.ROI_BOX_HEAD.IOU_BRANCH.STAGES = []
    # proposal sampler of the box head: "random" (Detectron2) or "ohem" (per-image top-loss proposals)
    cfg.MODEL.ROI_HEADS.SAMPLER = "random"
