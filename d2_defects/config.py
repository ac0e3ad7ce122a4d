"""Config keys added by d2_defects.

``add_defects_config(cfg)`` adds every key this project uses, each under a clearly named node with a
one-line comment.  Keys are only *added*; a YAML file or command-line option naming a key that does not
exist still fails with Detectron2's usual ``KeyError: 'Non-existent config key: ...'``.
"""
import difflib
import os

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .utils.errors import ConfigError, InputNotFoundError, UsageError

__all__ = ["add_defects_config", "load_config"]


def add_defects_config(cfg):
    """
    Add the d2_defects keys to a Detectron2 config (in place) and return it.

    Args:
        cfg (CfgNode): usually ``detectron2.config.get_cfg()``.
    """
    # Device: the code is device-agnostic; default to CUDA when present, else CPU.
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    _add_data_config(cfg)
    _add_models_config(cfg)
    _add_roi_heads_config(cfg)
    _add_soft_nms_config(cfg)
    _add_swa_config(cfg)
    _add_ema_config(cfg)
    _add_defect_eval_config(cfg)
    _add_tta_config(cfg)
    _add_slice_config(cfg)
    return cfg


def _add_defect_eval_config(cfg):
    """``TEST.DEFECT_EVAL``: the competition-style evaluator (d2_defects.evaluation.DefectEvaluator)."""
    cfg.TEST.DEFECT_EVAL = CN()
    # Add a DefectEvaluator next to COCOEvaluator for every DATASETS.TEST entry.
    cfg.TEST.DEFECT_EVAL.ENABLED = True
    # IoU thresholds: preset "coco" (0.50:0.05:0.95), "voc" (0.5), "fabric" (0.1, 0.3, 0.5), "bottle"
    # (from the GT box's shorter side), or a list of floats in (0, 1]; None means "coco".
    cfg.TEST.DEFECT_EVAL.IOU = None
    # AP integration: "coco" (101-point interpolated) or "voc" (all-point area).
    cfg.TEST.DEFECT_EVAL.AP_METHOD = "coco"
    # Per-class weights of weighted_mAP (one per class, >= 0); empty: metadata thing_class_weights, else uniform.
    cfg.TEST.DEFECT_EVAL.CLASS_WEIGHTS = []
    # An image counts as defective when its defect_score (or best detection score) reaches this (0-1).
    cfg.TEST.DEFECT_EVAL.IMAGE_SCORE_THRESHOLD = 0.5
    # score = (ACC_WEIGHT * ACC + MAP_WEIGHT * weighted_mAP) / (ACC_WEIGHT + MAP_WEIGHT); fabric: 0.2 / 0.8.
    cfg.TEST.DEFECT_EVAL.ACC_WEIGHT = 0.0
    # Weight of the mAP term in score (>= 0).
    cfg.TEST.DEFECT_EVAL.MAP_WEIGHT = 1.0
    # Which mAP enters score: "weighted_mAP" (class weights; bottle) or "mAP" (plain mean over classes; fabric).
    cfg.TEST.DEFECT_EVAL.SCORE_MAP = "weighted_mAP"


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
    # Fragment decay, after (soft-)NMS and the top-k cut: a detection with at least OVERLAP (fraction of its own
    # box area, in (0, 1]) inside a larger, higher-scoring detection of its class gets its score multiplied by
    # FACTOR (in [0, 1); 0 drops it). Parts of a long thin defect detected next to the whole one.
    cfg.MODEL.FRAGMENT_DECAY = CN()
    cfg.MODEL.FRAGMENT_DECAY.ENABLED = False
    cfg.MODEL.FRAGMENT_DECAY.OVERLAP = 0.6
    cfg.MODEL.FRAGMENT_DECAY.FACTOR = 0.5


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


def _add_swa_config(cfg):
    """Stochastic weight averaging (d2_defects/engine/swa.py)."""
    cfg.SOLVER.SWA = CN()
    # Train NUM_CYCLES * CYCLE_ITERS more iterations after SOLVER.MAX_ITER and average the cycle ends.
    cfg.SOLVER.SWA.ENABLED = False
    # Number of cycles = number of snapshots in the average.
    cfg.SOLVER.SWA.NUM_CYCLES = 12
    # Length of one cycle (iterations; e.g. one epoch).
    cfg.SOLVER.SWA.CYCLE_ITERS = 1000
    # LR at the first iteration of each cycle (multiple of SOLVER.BASE_LR).
    cfg.SOLVER.SWA.LR_START_FACTOR = 1.0
    # LR at the last iteration of each cycle, whose weights join the average (multiple of SOLVER.BASE_LR).
    cfg.SOLVER.SWA.LR_END_FACTOR = 0.01
    # Shape of the LR fall within a cycle: "linear" or "cosine" (half cosine wave).
    cfg.SOLVER.SWA.LR_SHAPE = "linear"
    # Training batches used to recompute BatchNorm statistics of the averaged model (0: skip; FrozenBN: no-op).
    cfg.SOLVER.SWA.BN_UPDATE_ITERS = 200


def _add_ema_config(cfg):
    """Exponential moving average of the weights (d2_defects/engine/ema.py)."""
    cfg.MODEL_EMA = CN()
    # Keep an EMA of the weights (BN statistics included), save it in checkpoints and as model_ema.pth.
    cfg.MODEL_EMA.ENABLED = False
    # Decay per iteration, in [0, 1): ema = d * ema + (1 - d) * weights (0.999: about 1000 iterations of memory).
    cfg.MODEL_EMA.DECAY = 0.999
    # Ramp of the decay, iterations: d_t = DECAY * (1 - exp(-t / WARMUP_ITERS)); 0 = constant DECAY.
    cfg.MODEL_EMA.WARMUP_ITERS = 200
    # Evaluate the EMA weights next to the live ones (results under "ema/", e.g. ema/bbox/AP).
    cfg.MODEL_EMA.EVAL = True


def _add_data_config(cfg):
    """Dataset registration/validation and the defect augmentations (see d2_defects/data/)."""
    # YAML datasets manifest registered at setup in every process ("" = none); see datasets/README.md
    cfg.DATASETS.MANIFEST = ""
    # what to do with bad records: "error" (one summary error), "warn" (log + drop those images),
    # "clip" (clip boxes outside their image, error on the rest), "none" (no checks)
    cfg.DATASETS.VALIDATION = "error"
    # category names dropped with their boxes from manifest datasets (count logged), e.g. ["背景"]
    cfg.DATASETS.IGNORE_CATEGORIES = []

    # images with more than 8 bits per pixel (16-bit PNG/TIFF of industrial cameras), scaled linearly to 0..255:
    # [] = the full range of the pixel type (0..65535 for 16-bit), or [LOW, HIGH] in pixel values, e.g. [0, 4095]
    # for 12-bit data (<= LOW -> 0, >= HIGH -> 255). 8-bit images are unchanged. See docs/reliability.md.
    cfg.INPUT.HIGH_BIT_DEPTH = CN()
    cfg.INPUT.HIGH_BIT_DEPTH.WINDOW = []

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

    # DefectSOLO (modeling/meta_arch/solo.py, docs/masks.md): SOLOv2-style instance segmentation on an FPN.
    _C.MODEL.SOLO = CN()
    _C.MODEL.SOLO.NUM_CLASSES = 80  # number of foreground classes
    _C.MODEL.SOLO.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]  # FPN levels the category/kernel heads run on
    _C.MODEL.SOLO.NUM_GRIDS = [40, 36, 24, 16, 12]  # S of each level's S x S grid of instance cells
    # Instances whose scale sqrt(w * h) (input px, after resizing) lies in [low, high] are assigned to that level
    _C.MODEL.SOLO.SCALE_RANGES = [[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]]
    _C.MODEL.SOLO.SIGMA = 0.2  # centre region: this fraction of the box's size around the centre is positive
    _C.MODEL.SOLO.CENTER = "box"  # the instance's centre: "box" (its box centre) or "mass" (its mask's mass centre)
    _C.MODEL.SOLO.HEAD_CONVS = 4  # conv layers of the category and kernel towers
    _C.MODEL.SOLO.HEAD_CHANNELS = 256  # channels of those towers
    _C.MODEL.SOLO.MASK_IN_FEATURES = ["p2", "p3", "p4", "p5"]  # FPN levels fused into the mask features
    _C.MODEL.SOLO.MASK_CHANNELS = 128  # channels of the mask features = length of each dynamic (1x1) kernel
    # Stride (input px) of the mask features: 4 (P2's resolution) or 8 (downsampled: each mask-feature pixel sees
    # twice the context, a quarter of the cost); masks are upsampled to the image for output
    _C.MODEL.SOLO.HEAD_STRIDE = 4
    _C.MODEL.SOLO.FOCAL_LOSS_ALPHA = 0.25  # category branch: focal loss alpha
    _C.MODEL.SOLO.FOCAL_LOSS_GAMMA = 2.0  # category branch: focal loss gamma
    _C.MODEL.SOLO.FOCAL_LOSS_WEIGHT = 1.0  # weight of loss_solo_cate (normalised by the number of positive cells)
    _C.MODEL.SOLO.DICE_LOSS_WEIGHT = 3.0  # weight of loss_solo_mask (dice loss of positive cells, per instance)
    _C.MODEL.SOLO.PRIOR_PROB = 0.01  # initial foreground probability of the category branch (bias init)
    _C.MODEL.SOLO.SCORE_THRESH_TEST = 0.1  # category scores below are not candidates
    _C.MODEL.SOLO.MASK_THRESH_TEST = 0.5  # mask probability above which a pixel is in the mask
    _C.MODEL.SOLO.PRE_NMS_TOPK_TEST = 500  # candidates (by category score) decoded into masks per image
    _C.MODEL.SOLO.NMS_KERNEL = "gaussian"  # Matrix NMS decay: "gaussian" or "linear"
    _C.MODEL.SOLO.NMS_SIGMA = 2.0  # Matrix NMS gaussian sigma
    # Detections whose score after Matrix NMS is below are dropped (per image: TEST.DETECTIONS_PER_IMAGE)
    _C.MODEL.SOLO.UPDATE_THRESH_TEST = 0.05

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
    _C.MODEL.FREEZE.UNTIL_ITER = 0  # > 0: frozen only for this many iterations, then trained; 0: for the whole run


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


def _add_slice_config(cfg):
    """Sliced training and inference of large images (``d2_defects.data.slicing``, ``d2_defects.modeling.slicing``,
    docs/slicing.md)."""
    cfg.INPUT.SLICE = CN()
    # Train on tiles of the training images (cut at load time, nothing written), bool.
    cfg.INPUT.SLICE.ENABLED = False
    # Tile (height, width) in px of the original image; each tile is then resized like any training image
    # (INPUT.MIN_SIZE_TRAIN / MAX_SIZE_TRAIN).
    cfg.INPUT.SLICE.SIZE = (512, 512)
    # Fraction of a tile shared with its neighbour (tiles start every size - int(OVERLAP * size) px), in [0, 1).
    cfg.INPUT.SLICE.OVERLAP = 0.2
    # A box cut by a tile is kept, clipped, when at least this fraction of its area is inside; a tile that cuts a box
    # below it (but not to zero) is dropped, so that no defect pixels are taught as background. Fraction in (0, 1].
    cfg.INPUT.SLICE.MIN_VISIBLE = 0.5
    # Tiles without defects kept as negatives, per tile with defects (drawn once, seeded by SEED), >= 0.
    cfg.INPUT.SLICE.EMPTY_RATIO = 1.0
    # Also train on every whole image (resized as usual), as TEST.SLICE.INCLUDE_FULL runs it at test time, bool.
    cfg.INPUT.SLICE.INCLUDE_FULL = True
    cfg.TEST.SLICE = CN()
    # Run the model on overlapping tiles of each test image (at its original resolution) and merge, bool.
    cfg.TEST.SLICE.ENABLED = False
    # Tile (height, width) in px of the original image; each tile is then resized like any test image
    # (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST).
    cfg.TEST.SLICE.SIZE = (512, 512)
    # Fraction of a tile shared with its neighbour (tiles start every size - int(OVERLAP * size) px), in [0, 1).
    cfg.TEST.SLICE.OVERLAP = 0.2
    # Also run the whole image, resized as usual, as one more view (defects larger than a tile), bool.
    cfg.TEST.SLICE.INCLUDE_FULL = True
    # Tiles per forward pass (peak memory: this many resized tiles), count.
    cfg.TEST.SLICE.BATCH = 4
    # How the detections of all tiles (and views) are merged: "nms" (the heads' postprocessing, soft-NMS when
    # MODEL.SOFT_NMS.ENABLED), "soft_nms" or "wbf" (weighted boxes fusion), as TEST.AUG.MERGE.
    cfg.TEST.SLICE.MERGE = "nms"
    # IoU above which "wbf" fuses two boxes of one class (fraction).
    cfg.TEST.SLICE.WBF_IOU_THRESH = 0.55


def _all_keys(cfg, prefix=""):
    for k, v in cfg.items():
        if isinstance(v, dict):
            yield from _all_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _config_error(cfg, where, err):
    msg = str(err.args[0]) if err.args else str(err)
    hint = ""
    if "Non-existent" in msg:
        key = msg.rsplit(":", 1)[-1].strip()
        close = difflib.get_close_matches(key, list(_all_keys(cfg)), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"config error in {where}: {msg}{hint}")


def _check_opts(opts):
    """``KEY VALUE`` pairs only: a ``--flag`` among them was meant for the command line (argparse puts
    everything after the first override into the list)."""
    flags = [o for o in opts if isinstance(o, str) and o.startswith("--")]
    if flags:
        raise UsageError(
            f"{flags[0]} comes after the KEY VALUE overrides, so it was read as one of them; put every "
            f"--flag before the first KEY VALUE pair (e.g. train_net.py --config-file X {flags[0]} KEY VALUE)"
        )
    if len(opts) % 2:
        raise ConfigError(f"the command-line overrides must be KEY VALUE pairs; got an odd number ({len(opts)}): "
                          f"{' '.join(map(str, opts))}")


def load_config(config_file, opts=()):
    """get_cfg -> add_defects_config -> merge file -> merge opts (not frozen). A missing file, unknown key or
    malformed override is a :class:`ConfigError` (``InputNotFoundError``/``UsageError``) naming it."""
    cfg = add_defects_config(get_cfg())
    opts = list(opts)
    _check_opts(opts)
    if config_file:
        if not os.path.isfile(config_file):
            raise InputNotFoundError(f"config file not found: {config_file}")
        try:
            cfg.merge_from_file(config_file)
        except (KeyError, ValueError, AssertionError, TypeError) as e:
            raise _config_error(cfg, config_file, e) from None
    try:
        cfg.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise _config_error(cfg, "the command-line options", e) from None
    return cfg
