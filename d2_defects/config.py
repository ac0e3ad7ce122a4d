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

    _add_tta_config(cfg)
    return cfg


def _add_tta_config(cfg):
    """Test-time augmentation (``d2_defects.modeling.tta``), on top of Detectron2's ``TEST.AUG`` keys
    (``ENABLED``, ``MIN_SIZES`` short sides in px, ``MAX_SIZE`` px, ``FLIP`` horizontal flip)."""
    # Also run every size vertically flipped (defects have no "up"), bool.
    cfg.TEST.AUG.VFLIP = False
    # How the detections of the augmented inputs are merged: "nms" (the heads' postprocessing: hard NMS, or
    # soft-NMS when MODEL.SOFT_NMS.ENABLED), "soft_nms" (always soft-NMS) or "wbf" (weighted boxes fusion).
    cfg.TEST.AUG.MERGE = "nms"
    # IoU above which boxes of one class are fused by "wbf" (fraction).
    cfg.TEST.AUG.WBF_IOU_THRESH = 0.55
