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

    _add_soft_nms_config(cfg)
    return cfg


def _add_soft_nms_config(cfg):
    """Soft-NMS postprocessing and per-class score thresholds (see ``d2_defects.modeling.postprocess``)."""
    cfg.MODEL.SOFT_NMS = CN()
    # Replace hard NMS by soft-NMS in every head's postprocessing (ROI heads, cascade, FCOS, TTA merge).
    cfg.MODEL.SOFT_NMS.ENABLED = False
    # "linear" (score * (1 - IoU) above IOU_THRESHOLD), "gaussian" (score * exp(-IoU^2 / SIGMA)) or "hard".
    cfg.MODEL.SOFT_NMS.METHOD = "linear"
    # Gaussian soft-NMS parameter (> 0, unitless; used by METHOD "gaussian" only).
    cfg.MODEL.SOFT_NMS.SIGMA = 0.5
    # IoU (in [0, 1]) above which "linear" decays and "hard" suppresses.
    cfg.MODEL.SOFT_NMS.IOU_THRESHOLD = 0.5
    # Boxes whose decayed score falls below this (score units, >= 0) are dropped.
    cfg.MODEL.SOFT_NMS.SCORE_THRESHOLD = 0.001
    # Per-class score thresholds applied before (soft-)NMS: K floats, or empty = SCORE_THRESH_TEST for all.
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS = []
