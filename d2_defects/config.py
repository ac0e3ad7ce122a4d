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
    _add_models_config(cfg)

    return cfg


def _add_models_config(cfg):
    """Meta-architectures (DefectFCOS, DefectRCNN), timm backbones and freezing schemes."""
    _C = cfg
    # DCN in ResNet stages uses Detectron2's own MODEL.RESNETS.DEFORM_ON_PER_STAGE / DEFORM_MODULATED /
    # DEFORM_NUM_GROUPS, read by the "build_resnet_dcn_fpn_backbone" builders.

    _C.MODEL.FCOS = CN()
    _C.MODEL.FCOS.NUM_CLASSES = 80  # number of foreground classes
    _C.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]  # backbone features the head runs on
    _C.MODEL.FCOS.NUM_CONVS = 4  # conv layers in each head tower (classification, box)
    _C.MODEL.FCOS.HEAD_NORM = "GN"  # norm of the head towers: "", "GN", "BN" (per level), "SyncBN"
    _C.MODEL.FCOS.PRIOR_PROB = 0.01  # initial foreground probability of the classifier (bias init)
    _C.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5  # positives lie within this many strides of a box centre
    _C.MODEL.FCOS.FOCAL_LOSS_ALPHA = 0.25  # focal loss alpha (weight of positives)
    _C.MODEL.FCOS.FOCAL_LOSS_GAMMA = 2.0  # focal loss gamma (focusing exponent)
    _C.MODEL.FCOS.BOX_LOSS_TYPE = "giou"  # box regression loss: "giou", "diou", "ciou", "smooth_l1"
    _C.MODEL.FCOS.QUALITY_BRANCH = "centerness"  # quality target: "centerness" or "iou" (IoU of the predicted box)
    _C.MODEL.FCOS.SCORE_THRESH_TEST = 0.05  # detections scoring below are dropped (score = sqrt(cls*quality))
    _C.MODEL.FCOS.TOPK_CANDIDATES_TEST = 1000  # candidates kept per level before NMS
    _C.MODEL.FCOS.NMS_THRESH_TEST = 0.6  # IoU threshold of NMS (detections per image: TEST.DETECTIONS_PER_IMAGE)

    _C.MODEL.DEFECT_RCNN = CN()
    _C.MODEL.DEFECT_RCNN.IN_FEATURES = ["p5", "p6"]  # backbone features pooled by the image-level classifier
    _C.MODEL.DEFECT_RCNN.HIDDEN_DIM = 128  # width of the image classifier's hidden layer
    _C.MODEL.DEFECT_RCNN.LOSS_WEIGHT = 1.0  # weight of loss_image (BCE, defect=1 / normal=0)
    _C.MODEL.DEFECT_RCNN.SKIP_NORMAL_THRESHOLD = 0.0  # images with defect_score below skip the ROI heads (0: off)

    _C.MODEL.TIMM = CN()
    _C.MODEL.TIMM.NAME = "resnet18"  # timm model name (created with features_only=True, pretrained=False)
    _C.MODEL.TIMM.OUT_INDICES = [1, 2, 3, 4]  # timm feature indices; output names are "res<log2(stride)>"
    _C.MODEL.TIMM.PRETRAINED_WEIGHTS = ""  # local .pth/.safetensors state dict of the timm model, or "" (random init)

    _C.MODEL.FREEZE = CN()
    _C.MODEL.FREEZE.SCHEME = "none"  # "none", "backbone", "backbone+fpn", "all_but_heads"
    _C.MODEL.FREEZE.PATTERNS = []  # extra regexes (re.search on parameter names) of parameters to freeze
