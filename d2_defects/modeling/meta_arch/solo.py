"""``DefectSOLO``: instance segmentation by locations, in the spirit of SOLO / SOLOv2 (Wang et al., arXiv 1912.04488
and 2003.10152), written from the papers.

Each FPN level in ``MODEL.SOLO.IN_FEATURES`` is resized to an S x S grid (``NUM_GRIDS``). An instance whose scale
sqrt(w * h) lies in the level's ``SCALE_RANGES`` is assigned to the cells of the centre region around its centre
(``CENTER``: its box centre, or its mask's mass centre; the region is ``SIGMA`` of its box size, at most 3 x 3
cells). For every cell:

- the category branch predicts C class scores (sigmoid focal loss over all cells, normalised by the positive
  cells): ``loss_solo_cate``;
- the kernel branch (with two coordinate channels) predicts a dynamic 1x1 kernel of ``MASK_CHANNELS`` weights.
  The kernel convolved with the shared mask features (FPN levels ``MASK_IN_FEATURES`` fused at stride
  ``HEAD_STRIDE``, coordinates on the coarsest) gives the cell's mask: ``loss_solo_mask``, the dice loss of the
  positive cells' masks against their instances' masks (area-downsampled to the mask features), averaged per
  instance-cell.

At inference the candidates (cells x classes above ``SCORE_THRESH_TEST``, at most ``PRE_NMS_TOPK_TEST``) are
decoded into masks, their scores multiplied by the mean mask probability inside the mask ("maskness"), decayed
by Matrix NMS (:func:`d2_defects.layers.matrix_nms.matrix_nms`) and cut at ``UPDATE_THRESH_TEST`` and
``TEST.DETECTIONS_PER_IMAGE``. Outputs: ``pred_masks`` (bool, image size), ``pred_boxes`` (the masks' boxes),
``scores``, ``pred_classes``.
"""
import math
from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, get_norm
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import BitMasks, Boxes, ImageList, Instances, PolygonMasks
from fvcore.nn import sigmoid_focal_loss_jit
from torch import nn
from torch.nn import functional as F

from ...layers.matrix_nms import MATRIX_NMS_KERNELS, matrix_nms
from ...utils.errors import ConfigError

__all__ = ["DefectSOLO", "SOLO_CENTERS", "dice_loss", "mass_centers"]

SOLO_CENTERS = ("box", "mass")


def _with_coords(x):
    """``x`` (N, C, H, W) with two channels appended: the x and y coordinates, in [-1, 1]."""
    n, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.cat([x, xx.expand(n, 1, h, w), yy.expand(n, 1, h, w)], dim=1)


def _tower(in_channels, channels, num_convs):
    layers = []
    for k in range(num_convs):
        layers += [Conv2d(in_channels if k == 0 else channels, channels, 3, padding=1, bias=False,
                          norm=get_norm("GN", channels)), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def dice_loss(logits, targets):
    """Dice loss per instance: ``1 - 2 sum(p t) / (sum(p^2) + sum(t^2))`` with p = sigmoid(logits); (K,) losses."""
    p = logits.sigmoid().flatten(1)
    t = targets.flatten(1)
    return 1 - 2 * (p * t).sum(1) / ((p * p).sum(1) + (t * t).sum(1) + 1e-3)


def mass_centers(masks, boxes):
    """(x, y) mass centre of each mask (N, H, W) in pixels (pixel centres at +0.5); an empty mask: its box centre."""
    n, h, w = masks.shape
    m = masks.float()
    area = m.sum((1, 2))
    xs = torch.arange(w, device=m.device, dtype=m.dtype) + 0.5
    ys = torch.arange(h, device=m.device, dtype=m.dtype) + 0.5
    cx = (m.sum(1) * xs).sum(1) / area.clamp(min=1)
    cy = (m.sum(2) * ys).sum(1) / area.clamp(min=1)
    box_c = (boxes[:, :2] + boxes[:, 2:]) / 2
    empty = area == 0
    return torch.stack([torch.where(empty, box_c[:, 0], cx), torch.where(empty, box_c[:, 1], cy)], 1)


class SOLOHead(nn.Module):
    """Category and kernel branches, shared over levels; each level's features resized to its S x S grid."""

    def __init__(self, in_channels, num_classes, num_grids, num_convs, channels, kernel_dim, prior_prob):
        super().__init__()
        self.num_grids = list(num_grids)
        self.cate_tower = _tower(in_channels, channels, num_convs)
        self.kernel_tower = _tower(in_channels + 2, channels, num_convs)
        self.cate_pred = nn.Conv2d(channels if num_convs else in_channels, num_classes, 3, padding=1)
        self.kernel_pred = nn.Conv2d(channels if num_convs else in_channels + 2, kernel_dim, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        nn.init.constant_(self.cate_pred.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features):
        """Returns per level: category logits (N, C, S, S) and kernels (N, E, S, S)."""
        cates, kernels = [], []
        for f, s in zip(features, self.num_grids):
            x = F.interpolate(_with_coords(f), size=(s, s), mode="bilinear", align_corners=False)
            kernels.append(self.kernel_pred(self.kernel_tower(x)))
            cates.append(self.cate_pred(self.cate_tower(x[:, :-2])))
        return cates, kernels


class MaskFeatures(nn.Module):
    """The shared mask features: each level's 3x3 conv resized to stride ``HEAD_STRIDE`` and summed (the coarsest
    level with coordinate channels), then a 1x1 conv to ``MASK_CHANNELS``."""

    def __init__(self, in_channels, channels):
        super().__init__()
        n = len(in_channels)
        self.convs = nn.ModuleList(
            Conv2d(c + (2 if k == n - 1 else 0), channels, 3, padding=1, bias=False, norm=get_norm("GN", channels),
                   activation=F.relu)
            for k, c in enumerate(in_channels)
        )
        self.out = Conv2d(channels, channels, 1, bias=False, norm=get_norm("GN", channels), activation=F.relu)

    def forward(self, features, size):
        total = 0
        for k, (f, conv) in enumerate(zip(features, self.convs)):
            x = conv(_with_coords(f) if k == len(features) - 1 else f)
            if tuple(x.shape[-2:]) != tuple(size):
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            total = total + x
        return self.out(total)


@META_ARCH_REGISTRY.register()
class DefectSOLO(nn.Module):
    """SOLOv2-style instance segmentation (see the module docstring); ``MODEL.SOLO.*``."""

    @configurable
    def __init__(self, *, backbone, head, mask_branch, in_features, mask_in_features, num_classes, scale_ranges,
                 sigma=0.2, center="box", head_stride=4, focal_alpha=0.25, focal_gamma=2.0, focal_weight=1.0,
                 dice_weight=3.0, score_thresh=0.1, mask_thresh=0.5, pre_nms_topk=500, nms_kernel="gaussian",
                 nms_sigma=2.0, update_thresh=0.05, max_per_image=100, pixel_mean, pixel_std):
        super().__init__()
        self.backbone, self.head, self.mask_branch = backbone, head, mask_branch
        self.in_features, self.mask_in_features = list(in_features), list(mask_in_features)
        self.num_classes = num_classes
        self.num_grids = head.num_grids
        self.scale_ranges = [tuple(float(v) for v in r) for r in scale_ranges]
        self.sigma, self.center, self.head_stride = sigma, center, head_stride
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.focal_weight, self.dice_weight = focal_weight, dice_weight
        self.score_thresh, self.mask_thresh, self.pre_nms_topk = score_thresh, mask_thresh, pre_nms_topk
        self.nms_kernel, self.nms_sigma, self.update_thresh = nms_kernel, nms_sigma, update_thresh
        self.max_per_image = max_per_image
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.SOLO
        if c.NUM_CLASSES < 1:
            raise ConfigError(f"MODEL.SOLO.NUM_CLASSES must be >= 1, got {c.NUM_CLASSES}")
        if c.CENTER not in SOLO_CENTERS:
            raise ConfigError(f"MODEL.SOLO.CENTER must be one of {SOLO_CENTERS}, got {c.CENTER!r}")
        if c.NMS_KERNEL not in MATRIX_NMS_KERNELS:
            raise ConfigError(f"MODEL.SOLO.NMS_KERNEL must be one of {MATRIX_NMS_KERNELS}, got {c.NMS_KERNEL!r}")
        if not cfg.MODEL.MASK_ON:
            raise ConfigError("MODEL.META_ARCHITECTURE DefectSOLO predicts masks: set MODEL.MASK_ON True (it makes "
                              "the evaluation report segm AP and checks that the datasets have masks)")
        n = len(c.IN_FEATURES)
        if not n or len(c.NUM_GRIDS) != n or len(c.SCALE_RANGES) != n:
            raise ConfigError(f"MODEL.SOLO.NUM_GRIDS ({len(c.NUM_GRIDS)}) and MODEL.SOLO.SCALE_RANGES "
                              f"({len(c.SCALE_RANGES)}) need one entry per MODEL.SOLO.IN_FEATURES level ({n})")
        if any(int(s) < 1 for s in c.NUM_GRIDS):
            raise ConfigError(f"MODEL.SOLO.NUM_GRIDS must be positive integers, got {list(c.NUM_GRIDS)}")
        if any(len(r) != 2 or not 0 <= r[0] <= r[1] for r in c.SCALE_RANGES):
            raise ConfigError(f"MODEL.SOLO.SCALE_RANGES must be [low, high] pairs with 0 <= low <= high (px), got "
                              f"{list(c.SCALE_RANGES)}")
        if c.HEAD_CHANNELS % 32 or c.MASK_CHANNELS % 32 or c.HEAD_CHANNELS < 32 or c.MASK_CHANNELS < 32:
            raise ConfigError(f"MODEL.SOLO.HEAD_CHANNELS ({c.HEAD_CHANNELS}) and MASK_CHANNELS ({c.MASK_CHANNELS}) "
                              "must be multiples of 32 (GroupNorm with 32 groups)")
        if c.HEAD_CONVS < 0:
            raise ConfigError(f"MODEL.SOLO.HEAD_CONVS must be >= 0, got {c.HEAD_CONVS}")
        if not 0 < c.SIGMA <= 1:
            raise ConfigError(f"MODEL.SOLO.SIGMA must be in (0, 1] (a fraction of the box size), got {c.SIGMA}")
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        for key, feats in (("IN_FEATURES", c.IN_FEATURES), ("MASK_IN_FEATURES", c.MASK_IN_FEATURES)):
            missing = [f for f in feats if f not in shapes]
            if missing or not feats:
                raise ConfigError(f"MODEL.SOLO.{key}: {missing or '[]'} not in the backbone outputs {sorted(shapes)}")
        channels = {shapes[f].channels for f in c.IN_FEATURES}
        if len(channels) != 1:
            raise ConfigError(f"MODEL.SOLO.IN_FEATURES must have equal channels (an FPN), got {channels}")
        finest = min(shapes[f].stride for f in c.MASK_IN_FEATURES)
        divisible = max(backbone.size_divisibility, 1)
        if c.HEAD_STRIDE < finest or divisible % c.HEAD_STRIDE:
            raise ConfigError(f"MODEL.SOLO.HEAD_STRIDE must be >= the finest MASK_IN_FEATURES stride ({finest}) and "
                              f"divide the backbone's size divisibility ({divisible}), got {c.HEAD_STRIDE}")
        head = SOLOHead(channels.pop(), c.NUM_CLASSES, [int(s) for s in c.NUM_GRIDS], c.HEAD_CONVS, c.HEAD_CHANNELS,
                        c.MASK_CHANNELS, c.PRIOR_PROB)
        mask_branch = MaskFeatures([shapes[f].channels for f in c.MASK_IN_FEATURES], c.MASK_CHANNELS)
        return {
            "backbone": backbone, "head": head, "mask_branch": mask_branch, "in_features": c.IN_FEATURES,
            "mask_in_features": c.MASK_IN_FEATURES, "num_classes": c.NUM_CLASSES, "scale_ranges": c.SCALE_RANGES,
            "sigma": c.SIGMA, "center": c.CENTER, "head_stride": c.HEAD_STRIDE, "focal_alpha": c.FOCAL_LOSS_ALPHA,
            "focal_gamma": c.FOCAL_LOSS_GAMMA, "focal_weight": c.FOCAL_LOSS_WEIGHT, "dice_weight": c.DICE_LOSS_WEIGHT,
            "score_thresh": c.SCORE_THRESH_TEST, "mask_thresh": c.MASK_THRESH_TEST,
            "pre_nms_topk": c.PRE_NMS_TOPK_TEST, "nms_kernel": c.NMS_KERNEL, "nms_sigma": c.NMS_SIGMA,
            "update_thresh": c.UPDATE_THRESH_TEST, "max_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs):
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.backbone.size_divisibility,
                                      padding_constraints=self.backbone.padding_constraints)

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        images = self.preprocess_image(batched_inputs)
        feats = self.backbone(images.tensor)
        cates, kernels = self.head([feats[f] for f in self.in_features])
        H, W = images.tensor.shape[-2:]
        mask_feats = self.mask_branch([feats[f] for f in self.mask_in_features],
                                      (H // self.head_stride, W // self.head_stride))
        if self.training:
            targets = [x["instances"].to(self.device) for x in batched_inputs]
            return self.losses(cates, kernels, mask_feats, targets, (H, W))
        out = []
        for i, x in enumerate(batched_inputs):
            h, w = images.image_sizes[i]
            r = self.inference_single([c[i] for c in cates], [k[i] for k in kernels], mask_feats[i], (h, w),
                                      (x.get("height", h), x.get("width", w)))
            out.append({"instances": r})
        return out

    # ------------------------------------------------------------------------------------------ training
    def _gt_masks(self, inst, padded):
        """The instances' masks as float (K, H, W) on the padded input."""
        h, w = inst.image_size
        masks = inst.gt_masks
        if isinstance(masks, PolygonMasks):
            masks = BitMasks.from_polygon_masks(masks, h, w)
        t = masks.tensor.to(self.device, torch.float32)
        return F.pad(t, (0, padded[1] - t.shape[-1], 0, padded[0] - t.shape[-2]))

    def targets_single(self, inst, padded):
        """
        Grid targets of one image: per level, ``labels`` (S*S,) with ``num_classes`` for background, ``pos`` (the
        positive cells) and ``masks`` (len(pos), H/stride, W/stride): the mask targets of the positive cells.
        Larger instances are assigned first, so a smaller one takes a shared cell.
        """
        H, W = padded
        size = (H // self.head_stride, W // self.head_stride)
        n = len(inst)
        full = self._gt_masks(inst, padded) if n else torch.zeros(0, H, W, device=self.device)
        small = F.interpolate(full[None], size=size, mode="area")[0] if n else full.new_zeros((0, *size))
        boxes = inst.gt_boxes.tensor
        wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
        scale = (wh[:, 0] * wh[:, 1]).sqrt()
        centers = mass_centers(full, boxes) if self.center == "mass" else (boxes[:, :2] + boxes[:, 2:]) / 2
        classes = inst.gt_classes
        order = torch.argsort(wh[:, 0] * wh[:, 1], descending=True).tolist()
        out = []
        for s, (lo, hi) in zip(self.num_grids, self.scale_ranges):
            labels = torch.full((s * s,), self.num_classes, dtype=torch.long, device=self.device)
            owner = torch.full((s * s,), -1, dtype=torch.long, device=self.device)
            for i in order:
                if not lo <= float(scale[i]) <= hi:
                    continue
                cx, cy = float(centers[i, 0]), float(centers[i, 1])
                hw, hh = self.sigma * float(wh[i, 0]) / 2, self.sigma * float(wh[i, 1]) / 2
                col, row = min(int(cx / W * s), s - 1), min(int(cy / H * s), s - 1)
                top = max(int((cy - hh) / H * s), 0, row - 1)
                bottom = min(int((cy + hh) / H * s), s - 1, row + 1)
                left = max(int((cx - hw) / W * s), 0, col - 1)
                right = min(int((cx + hw) / W * s), s - 1, col + 1)
                rows = torch.arange(min(top, row), max(bottom, row) + 1, device=self.device)
                cols = torch.arange(min(left, col), max(right, col) + 1, device=self.device)
                cells = (rows[:, None] * s + cols[None, :]).flatten()
                labels[cells] = classes[i]
                owner[cells] = i
            pos = torch.nonzero(owner >= 0).flatten()
            out.append({"labels": labels, "pos": pos, "masks": small[owner[pos]]})
        return out

    def losses(self, cates, kernels, mask_feats, targets, padded):
        per_image = [self.targets_single(inst, padded) for inst in targets]
        logits, labels, dice = [], [], []
        for lvl, (cate, kern) in enumerate(zip(cates, kernels)):
            n, c, s, _ = cate.shape
            logits.append(cate.permute(0, 2, 3, 1).reshape(n, s * s, c))
            labels.append(torch.stack([t[lvl]["labels"] for t in per_image]))
            for i, t in enumerate(per_image):
                pos = t[lvl]["pos"]
                if len(pos) == 0:
                    continue
                k = kern[i].flatten(1).T[pos]  # (K, E)
                pred = (k @ mask_feats[i].flatten(1)).view(len(pos), *mask_feats.shape[-2:])
                dice.append(dice_loss(pred, t[lvl]["masks"]))
        logits, labels = torch.cat(logits, 1), torch.cat(labels, 1)
        num_pos = int((labels != self.num_classes).sum())
        onehot = F.one_hot(labels, self.num_classes + 1)[..., :self.num_classes].to(logits.dtype)
        loss_cate = sigmoid_focal_loss_jit(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma,
                                           reduction="sum") / max(num_pos, 1)
        if dice:
            loss_mask = torch.cat(dice).mean()
        else:  # no instance in the batch: a zero that keeps the kernel branch in the graph
            loss_mask = sum(k.sum() for k in kernels) * 0.0
        return {"loss_solo_cate": self.focal_weight * loss_cate, "loss_solo_mask": self.dice_weight * loss_mask}

    # ------------------------------------------------------------------------------------------ inference
    def inference_single(self, cates, kernels, mask_feats, image_size, output_size):
        """Detections of one image (see the module docstring) at ``output_size`` (height, width)."""
        h, w = image_size
        scores = torch.cat([c.sigmoid().permute(1, 2, 0).reshape(-1, self.num_classes) for c in cates])
        kern = torch.cat([k.permute(1, 2, 0).reshape(-1, k.shape[0]) for k in kernels])
        cand = torch.nonzero(scores > self.score_thresh)
        cand_scores = scores[cand[:, 0], cand[:, 1]]
        if len(cand_scores) > self.pre_nms_topk:
            top = torch.topk(cand_scores, self.pre_nms_topk).indices
            cand, cand_scores = cand[top], cand_scores[top]
        hm, wm = math.ceil(h / self.head_stride), math.ceil(w / self.head_stride)
        probs = (kern[cand[:, 0]] @ mask_feats.flatten(1)).view(len(cand), *mask_feats.shape[-2:])
        probs = probs.sigmoid()[:, :hm, :wm]
        binary = probs > self.mask_thresh
        area = binary.flatten(1).sum(1)
        keep = area > 0
        probs, binary, area = probs[keep], binary[keep], area[keep]
        classes, cand_scores = cand[keep, 1], cand_scores[keep]
        maskness = (probs * binary).flatten(1).sum(1) / area.clamp(min=1)
        cand_scores = cand_scores * maskness
        decayed = matrix_nms(binary, classes, cand_scores, self.nms_kernel, self.nms_sigma)
        keep = torch.nonzero(decayed >= self.update_thresh).flatten()
        keep = keep[torch.argsort(decayed[keep], descending=True)][: self.max_per_image]
        result = Instances(tuple(output_size))
        result.scores = decayed[keep]
        result.pred_classes = classes[keep]
        masks = self._resize_masks(probs[keep], (h, w), output_size)
        result.pred_masks = masks
        result.pred_boxes = BitMasks(masks).get_bounding_boxes() if len(masks) else Boxes(masks.new_zeros((0, 4)))
        return result

    def _resize_masks(self, probs, image_size, output_size, chunk=32):
        """Mask probabilities at stride ``head_stride`` -> bool masks of ``output_size``: upsampled to the input
        pixels, cut to the image (without padding), resized to the output size, thresholded."""
        h, w = image_size
        out = torch.zeros((len(probs), *output_size), dtype=torch.bool, device=probs.device)
        for k in range(0, len(probs), chunk):
            p = F.interpolate(probs[None, k:k + chunk], scale_factor=self.head_stride, mode="bilinear",
                              align_corners=False)[:, :, :h, :w]
            p = F.interpolate(p, size=tuple(output_size), mode="bilinear", align_corners=False)[0]
            out[k:k + chunk] = p > self.mask_thresh
        return out
