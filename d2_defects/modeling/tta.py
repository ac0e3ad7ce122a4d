"""Test-time augmentation for every meta-architecture of the project.

Detectron2's ``GeneralizedRCNNWithTTA`` only accepts a ``GeneralizedRCNN``, reaches into its ROI heads and
merges with hard NMS. :class:`DefectTTA` only uses the standard inference contract shared by every
meta-architecture that returns ``instances`` (``model(list[dict]) -> list[{"instances": Instances}]``,
boxes rescaled to the input's ``height``/``width``), so it also wraps one-stage detectors.

Each input image is resized to every ``TEST.AUG.MIN_SIZES`` short side (long side capped at
``TEST.AUG.MAX_SIZE``), optionally flipped horizontally (``TEST.AUG.FLIP``) and vertically
(``TEST.AUG.VFLIP``); the model runs on all of them, boxes are flipped back in the original image's
coordinates and merged with ``TEST.AUG.MERGE`` (see :mod:`d2_defects.modeling.merge`). Image-level scalar
outputs next to ``instances`` (e.g. an image defect score) are averaged over the views.

Mask R-CNN heads (``MODEL.MASK_ON`` on a ``GeneralizedRCNN``): the merged boxes are mapped into every view, the
mask head runs on them there (``inference(..., detected_instances=...)``), the per-box mask probabilities of the
views are flipped back and averaged, then pasted into the image at threshold 0.5 -- what Detectron2's
``GeneralizedRCNNWithTTA`` does for masks (tested against it). DefectSOLO's masks are not merged (a config error).
"""
import contextlib

import torch
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.modeling import GeneralizedRCNN
from detectron2.structures import Boxes, Instances
from torch import nn

from .postprocess import PostprocessParams, views_postprocess
from ..utils.errors import ConfigError
from ..utils.modules import unwrap_model

__all__ = ["DefectTTA", "tta_options", "model_num_classes", "detections_to_instances", "mean_scalars"]


def model_num_classes(model):
    """
    K, the number of foreground classes of a detector: ``model.num_classes`` (one-stage detectors such as
    DefectFCOS, RetinaNet) or ``model.roi_heads.num_classes`` (R-CNNs); None when neither exists.
    """
    k = getattr(model, "num_classes", None)
    if k is None:
        k = getattr(getattr(model, "roi_heads", None), "num_classes", None)
    return None if k is None else int(k)


def tta_options(cfg):
    """Validated ``TEST.AUG`` options: dict of min_sizes, max_size, flip, vflip, merge, wbf_iou_thresh."""
    from .merge import MERGE_METHODS

    aug = cfg.TEST.AUG
    min_sizes = [int(s) for s in aug.MIN_SIZES]
    if not min_sizes or min(min_sizes) <= 0:
        raise ConfigError(f"TEST.AUG.MIN_SIZES must be a non-empty list of positive sizes, got {aug.MIN_SIZES}")
    if aug.MAX_SIZE <= 0:
        raise ConfigError(f"TEST.AUG.MAX_SIZE must be positive, got {aug.MAX_SIZE}")
    if aug.MERGE not in MERGE_METHODS:
        raise ConfigError(f"TEST.AUG.MERGE must be one of {MERGE_METHODS}, got {aug.MERGE!r}")
    if not 0 < aug.WBF_IOU_THRESH < 1:
        raise ConfigError(f"TEST.AUG.WBF_IOU_THRESH must be in (0, 1), got {aug.WBF_IOU_THRESH}")
    if cfg.MODEL.KEYPOINT_ON:
        raise ConfigError("TEST.AUG.ENABLED: test-time augmentation merges boxes and Mask R-CNN masks, not "
                          "keypoints (MODEL.KEYPOINT_ON must be False)")
    if cfg.MODEL.MASK_ON and cfg.MODEL.META_ARCHITECTURE == "DefectSOLO":
        raise ConfigError("TEST.AUG.ENABLED: test-time augmentation merges Mask R-CNN masks, not DefectSOLO's "
                          "(MODEL.META_ARCHITECTURE DefectSOLO)")
    return dict(min_sizes=min_sizes, max_size=int(aug.MAX_SIZE), flip=bool(aug.FLIP), vflip=bool(aug.VFLIP),
                merge=aug.MERGE, wbf_iou_thresh=float(aug.WBF_IOU_THRESH))


class DefectTTA(nn.Module):
    """
    Wraps a detector; ``forward`` has the detector's inference interface. Inputs should hold the image at
    its original resolution (the resizing is part of the augmentation), e.g. from a
    ``DatasetMapper(cfg, is_train=False, augmentations=[])``; an image that was already resized is resized
    again from its current size.
    """

    def __init__(self, cfg, model, batch_size=4):
        """
        Args:
            cfg (CfgNode): reads ``TEST.AUG.*`` and the postprocessing keys.
            model (nn.Module): any project detector (DDP-wrapped or not).
            batch_size (int): augmented images per forward pass.
        """
        super().__init__()
        model = unwrap_model(model)
        self.model = model
        self.options = tta_options(cfg)
        # SCORE_THRESH_PER_CLASS is checked against the classes of the model actually built
        self.params = PostprocessParams.from_config(cfg, num_classes=model_num_classes(model))
        self.batch_size = batch_size
        self.with_masks = bool(cfg.MODEL.MASK_ON)
        if self.with_masks and not (isinstance(model, GeneralizedRCNN) and getattr(model.roi_heads, "mask_on", False)):
            raise ConfigError(f"TEST.AUG.ENABLED with MODEL.MASK_ON: masks are merged for Mask R-CNN heads only, not "
                              f"for {type(model).__name__}")
        if self.with_masks and getattr(model, "skip_normal_threshold", 0) > 0:
            raise ConfigError("TEST.AUG.ENABLED with MODEL.MASK_ON: a view whose heads are skipped "
                              f"(MODEL.DEFECT_RCNN.SKIP_NORMAL_THRESHOLD={model.skip_normal_threshold}) has no masks to "
                              "average; set it to 0 for TTA")

    def augmentations(self):
        """list of (min_size, hflip, vflip) in the order they are run."""
        o = self.options
        out = []
        for s in o["min_sizes"]:
            out.append((s, False, False))
            if o["flip"]:
                out.append((s, True, False))
            if o["vflip"]:
                out.append((s, False, True))
        return out

    def _augmented_images(self, image):
        hwc = image.permute(1, 2, 0).cpu().numpy()
        resized = {}
        for s, hflip, vflip in self.augmentations():
            if s not in resized:
                tfm = ResizeShortestEdge(s, self.options["max_size"], "choice").get_transform(hwc)
                resized[s] = torch.as_tensor(tfm.apply_image(hwc).copy()).permute(2, 0, 1)
            img = resized[s]
            if hflip:
                img = img.flip(-1)
            if vflip:
                img = img.flip(-2)
            yield img.contiguous(), hflip, vflip

    def forward(self, batched_inputs):
        if self.training:
            raise RuntimeError("DefectTTA is for inference; call .eval() first")
        return [self._inference_one(x) for x in batched_inputs]

    @torch.no_grad()
    def view_detections(self, image, h, w):
        """
        Run the model on every augmented view of ``image`` (C, H, W at the resolution the views are resized
        from) and map the detections into an (h, w) frame, flips undone.

        Returns:
            lists, one entry per view: boxes (N_i, 4) XYXY, scores (N_i,), classes (N_i,), image-level extras
            (dict of the model's other outputs). Sliced inference merges the views of all tiles at once.
        """
        augmented = list(self._augmented_images(image))
        boxes, scores, classes, extras = [], [], [], []
        for i in range(0, len(augmented), self.batch_size):
            chunk = augmented[i:i + self.batch_size]
            outs = self.model([{"image": img, "height": h, "width": w} for img, _, _ in chunk])
            for (_, hflip, vflip), out in zip(chunk, outs):
                inst = out["instances"]
                extras.append({k: v for k, v in out.items() if k != "instances"})
                b = inst.pred_boxes.tensor.clone()
                # boxes are already in the original image's coordinates: undo the flips there
                if hflip:
                    b[:, [0, 2]] = w - b[:, [2, 0]]
                if vflip:
                    b[:, [1, 3]] = h - b[:, [3, 1]]
                boxes.append(b)
                scores.append(inst.scores)
                classes.append(inst.pred_classes)
        return boxes, scores, classes, extras

    @torch.no_grad()
    def _inference_one(self, inp):
        from .merge import merge_detections

        image = inp["image"]
        h, w = int(inp.get("height", image.shape[-2])), int(inp.get("width", image.shape[-1]))
        if self.with_masks and len(self.augmentations()) == 1:  # one view: the model's own output, masks included
            (img, _, _), = self._augmented_images(image)
            return self.model([{"image": img, "height": h, "width": w}])[0]
        with _masks_off(self.model if self.with_masks else None), \
                views_postprocess(self.model, self.params, len(self.augmentations())):
            # masks are made once, for the merged boxes; fragments are decayed once, in the merge
            boxes, scores, classes, extras = self.view_detections(image, h, w)
        if len(boxes) == 1:
            # one view: the model's own detections (re-running NMS on clipped boxes could drop some)
            b, s, c = boxes[0], scores[0], classes[0]
        else:
            b, s, c = merge_detections(boxes, scores, classes, (h, w), self.options["merge"], self.params,
                                       wbf_iou_thresh=self.options["wbf_iou_thresh"])
        ret = {"instances": detections_to_instances((h, w), b, s, c)}
        if self.with_masks:
            ret["instances"].pred_masks = self._merged_masks(image, b, c, h, w)
        ret.update(mean_scalars(extras))  # e.g. DefectRCNN's "defect_score": mean over the views
        return ret

    @torch.no_grad()
    def _merged_masks(self, image, boxes, classes, h, w):
        """(N, h, w) bool masks of the merged ``boxes`` (in the h x w frame): the mask head's probabilities for these
        boxes in every view, flips undone, averaged, pasted at threshold 0.5."""
        if len(boxes) == 0:
            return torch.zeros((0, h, w), dtype=torch.bool, device=boxes.device)
        views = []
        for img, hflip, vflip in self._augmented_images(image):
            vh, vw = img.shape[-2:]
            b = boxes.clone()
            b[:, 0::2] *= vw / w
            b[:, 1::2] *= vh / h
            if hflip:
                b[:, [0, 2]] = vw - b[:, [2, 0]]
            if vflip:
                b[:, [1, 3]] = vh - b[:, [3, 1]]
            views.append((img, Instances((vh, vw), pred_boxes=Boxes(b), pred_classes=classes), hflip, vflip))
        probs = []
        for i in range(0, len(views), self.batch_size):  # batched as the detection pass was
            chunk = views[i:i + self.batch_size]
            outs = self.model.inference([{"image": v[0]} for v in chunk], detected_instances=[v[1] for v in chunk],
                                        do_postprocess=False)
            for (_, _, hflip, vflip), out in zip(chunk, outs):
                m = out.pred_masks
                if hflip:  # a mask is drawn in its box: flipping the box back flips the mask inside it
                    m = m.flip(-1)
                if vflip:
                    m = m.flip(-2)
                probs.append(m)
        return paste_masks_in_image(torch.stack(probs).mean(0)[:, 0], boxes, (h, w), threshold=0.5)


@contextlib.contextmanager
def _masks_off(model):
    """Within the block, ``model``'s ROI heads skip the mask head (nothing happens for None)."""
    if model is None:
        yield
        return
    model.roi_heads.mask_on = False
    try:
        yield
    finally:
        model.roi_heads.mask_on = True


def detections_to_instances(image_size, boxes, scores, classes):
    """An ``Instances`` of ``image_size`` (h, w) with ``pred_boxes``, ``scores`` and ``pred_classes``."""
    result = Instances(image_size)
    result.pred_boxes = Boxes(boxes)
    result.scores = scores
    result.pred_classes = classes
    return result


def mean_scalars(extras):
    """The image-level scalar outputs (e.g. ``defect_score``) of several views of one image, averaged."""
    ret = {}
    for k in extras[0] if extras else ():
        vals = [e.get(k) for e in extras]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
            ret[k] = float(sum(vals) / len(vals))
    return ret
