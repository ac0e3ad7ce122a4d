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
    _add_data_config(cfg)

    return cfg


def _add_data_config(cfg):
    """Dataset registration/validation and the defect augmentations (see d2_defects/data/)."""
    # YAML datasets manifest registered at setup in every process ("" = none); see datasets/README.md
    cfg.DATASETS.MANIFEST = ""
    # what to do with bad records: "error" (one summary error), "warn" (log + drop those images),
    # "clip" (clip boxes outside their image, error on the rest), "none" (no checks)
    cfg.DATASETS.VALIDATION = "error"
    # category names dropped with their boxes from manifest datasets (count logged), e.g. ["背景"]
    cfg.DATASETS.IGNORE_CATEGORIES = []

    # vertical flip (defects have no "up"): probability per image
    cfg.INPUT.VFLIP = CN()
    cfg.INPUT.VFLIP.ENABLED = False
    cfg.INPUT.VFLIP.PROB = 0.5  # probability, 0..1
    # rotation by a random multiple of 90 degrees (90/180/270, image size swaps for 90/270)
    cfg.INPUT.ROT90 = CN()
    cfg.INPUT.ROT90.ENABLED = False
    cfg.INPUT.ROT90.PROB = 0.5  # probability of rotating at all, 0..1
    # photometric jitter, each factor drawn uniformly from the range (1.0 = unchanged)
    cfg.INPUT.PHOTOMETRIC = CN()
    cfg.INPUT.PHOTOMETRIC.ENABLED = False
    cfg.INPUT.PHOTOMETRIC.BRIGHTNESS = (0.8, 1.2)  # intensity factor range
    cfg.INPUT.PHOTOMETRIC.CONTRAST = (0.8, 1.2)  # contrast factor range
    cfg.INPUT.PHOTOMETRIC.SATURATION = (0.8, 1.2)  # saturation factor range (no effect on gray images)
    # copy-paste: defect crops from the training set pasted onto other images without covering defects
    cfg.INPUT.COPY_PASTE = CN()
    cfg.INPUT.COPY_PASTE.ENABLED = False
    cfg.INPUT.COPY_PASTE.PROB_NORMAL = 1.0  # probability of pasting onto a normal (defect-free) image
    cfg.INPUT.COPY_PASTE.PROB = 0.3  # probability of pasting onto an image that has defects
    cfg.INPUT.COPY_PASTE.MAX_OBJECTS = 3  # defects pasted per image (1..MAX_OBJECTS, uniform)
    cfg.INPUT.COPY_PASTE.CLASSES = []  # class names eligible for pasting ([] = all), e.g. rare classes
