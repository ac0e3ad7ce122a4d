"""Sliced inference (``TEST.SLICE.*``): run a detector on overlapping tiles of a large image and merge.

A 12-px defect on a 4096-px image resized to a 1333-px test size is 4 px, below what an FPN's finest level
resolves. With ``TEST.SLICE.ENABLED`` the image, at its original resolution, is cut into tiles of ``SIZE``
(h, w) px overlapping by ``OVERLAP`` (a fraction of the tile); each tile goes through the model as any test image
does (resized by ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``; set ``MIN_SIZE_TEST`` to the tile size to keep the
original scale), ``BATCH`` tiles per forward pass, and the boxes come back in the image's coordinates.
``INCLUDE_FULL`` adds the whole image, resized as usual, as one more view (for defects larger than a tile). All
views are merged once by ``MERGE`` with the project's merge code (:mod:`.merge`, as TTA): ``nms`` (the heads'
postprocessing, soft-NMS when ``MODEL.SOFT_NMS.ENABLED``), ``soft_nms`` or ``wbf``.

The grid (:func:`tile_grid`) covers every pixel: tiles start every ``size - int(overlap * size)`` px and the last
tile of a row or column is shifted back inside the image rather than padded (the convention of SAHI's
``get_slice_bboxes``); an image smaller than a tile is one tile. With test-time augmentation (``TEST.AUG``) every
tile's augmented views join the same single merge. Image-level outputs (DefectRCNN's ``defect_score``) come
from the full view when ``INCLUDE_FULL``, else the maximum over the tiles (a defect in any tile makes the image
defective). When the grid is one tile covering the whole image and nothing else runs, the result is exactly the
model's plain inference. Memory: one input image plus ``BATCH`` resized tiles, whatever the image size.
"""
import torch
from detectron2.data.transforms import ResizeShortestEdge
from torch import nn

from .merge import MERGE_METHODS, merge_detections
from .postprocess import PostprocessParams, views_postprocess
from .tta import DefectTTA, detections_to_instances, mean_scalars, model_num_classes
from ..utils.errors import ConfigError
from ..utils.modules import unwrap_model
from ..utils.tiles import tile_grid, tile_starts  # noqa: F401  (re-exported)

__all__ = ["SlicedDetector", "slice_options", "tile_grid", "tile_starts"]


def slice_options(cfg):
    """Validated ``TEST.SLICE`` options (dict: size (h, w), overlap, include_full, batch, merge, wbf_iou_thresh);
    a bad value is a :class:`ConfigError` naming its key."""
    s = cfg.TEST.SLICE
    size = [int(v) for v in s.SIZE]
    if len(size) != 2 or min(size) <= 0:
        raise ConfigError(f"TEST.SLICE.SIZE must be (height, width) in px, both > 0; got {tuple(s.SIZE)}")
    if not 0 <= s.OVERLAP < 1:
        raise ConfigError(f"TEST.SLICE.OVERLAP must be a fraction in [0, 1); got {s.OVERLAP}")
    if int(s.BATCH) < 1:
        raise ConfigError(f"TEST.SLICE.BATCH must be >= 1 (tiles per forward pass); got {s.BATCH}")
    if s.MERGE not in MERGE_METHODS:
        raise ConfigError(f"TEST.SLICE.MERGE must be one of {MERGE_METHODS}; got {s.MERGE!r}")
    if not 0 < s.WBF_IOU_THRESH < 1:
        raise ConfigError(f"TEST.SLICE.WBF_IOU_THRESH must be in (0, 1); got {s.WBF_IOU_THRESH}")
    if cfg.MODEL.MASK_ON or cfg.MODEL.KEYPOINT_ON:
        raise ConfigError("TEST.SLICE.ENABLED: sliced inference merges boxes only (MODEL.MASK_ON and "
                          "MODEL.KEYPOINT_ON must be False)")
    return dict(size=tuple(size), overlap=float(s.OVERLAP), include_full=bool(s.INCLUDE_FULL), batch=int(s.BATCH),
                merge=s.MERGE, wbf_iou_thresh=float(s.WBF_IOU_THRESH))


class SlicedDetector(nn.Module):
    """
    Wraps a detector (any meta-architecture with the ``instances`` inference contract); ``forward`` has the
    detector's inference interface. Inputs hold the image at its original resolution (e.g. from
    ``build_defect_test_mapper(cfg, augmentations=[])``); boxes are returned in the input's ``height`` /
    ``width``. See the module docstring.
    """

    def __init__(self, cfg, model, tta=False):
        """
        Args:
            cfg (CfgNode): reads ``TEST.SLICE.*``, ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``, the postprocessing
                keys and, with ``tta``, ``TEST.AUG.*``.
            model (nn.Module): the detector (DDP-wrapped or not).
            tta (bool): run every view through :class:`DefectTTA` (its views join the single merge).
        """
        super().__init__()
        model = unwrap_model(model)
        self.model = model
        self.options = slice_options(cfg)
        self.params = PostprocessParams.from_config(cfg, num_classes=model_num_classes(model))
        self.resize = ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
        self.tta = DefectTTA(cfg, model, batch_size=self.options["batch"]) if tta else None

    def views(self, height, width):
        """The regions the model runs on, ``(x0, y0, x1, y1)``: the tiles, then the whole image if ``INCLUDE_FULL``
        (and it is not already the only tile)."""
        th, tw = self.options["size"]
        tiles = tile_grid(height, width, th, tw, self.options["overlap"])
        full = (0, 0, width, height)
        if self.options["include_full"] and tiles != [full]:
            tiles.append(full)
        return tiles

    def forward(self, batched_inputs):
        if self.training:
            raise RuntimeError("SlicedDetector is for inference; call .eval() first")
        return [self._inference_one(x) for x in batched_inputs]

    def _resized(self, crop):
        hwc = crop.permute(1, 2, 0).cpu().numpy()
        out = self.resize.get_transform(hwc).apply_image(hwc)
        return torch.as_tensor(out.copy()).permute(2, 0, 1).contiguous()

    def _views_detections(self, image, views, sx, sy):
        ih, iw = image.shape[-2:]
        boxes, scores, classes, extras, is_full = [], [], [], [], []
        for i in range(0, len(views), 1 if self.tta is not None else self.options["batch"]):
            chunk = views[i:i + (1 if self.tta is not None else self.options["batch"])]
            crops = [image[:, y0:y1, x0:x1] for x0, y0, x1, y1 in chunk]
            if self.tta is not None:
                (x0, y0, x1, y1), crop = chunk[0], crops[0]
                vb, vs, vc, ve = self.tta.view_detections(crop, y1 - y0, x1 - x0)
                per_view = [(chunk[0], b, s, c, e) for b, s, c, e in zip(vb, vs, vc, ve)]
            else:
                outs = self.model([{"image": self._resized(c), "height": y1 - y0, "width": x1 - x0}
                                   for c, (x0, y0, x1, y1) in zip(crops, chunk)])
                per_view = [(v, o["instances"].pred_boxes.tensor, o["instances"].scores, o["instances"].pred_classes,
                             {k: val for k, val in o.items() if k != "instances"}) for v, o in zip(chunk, outs)]
            for (x0, y0, x1, y1), b, s, c, e in per_view:
                b = b.clone()
                b[:, [0, 2]] = (b[:, [0, 2]] + x0) * sx
                b[:, [1, 3]] = (b[:, [1, 3]] + y0) * sy
                boxes.append(b)
                scores.append(s)
                classes.append(c)
                extras.append(e)
                is_full.append((x0, y0, x1, y1) == (0, 0, iw, ih))
        return boxes, scores, classes, extras, is_full

    @torch.no_grad()
    def _inference_one(self, inp):
        image = inp["image"]
        ih, iw = image.shape[-2:]
        h, w = int(inp.get("height", ih)), int(inp.get("width", iw))
        sx, sy = w / iw, h / ih  # the input image may differ from the size the boxes are reported in
        views = self.views(ih, iw)
        n_views = len(views) * (len(self.tta.augmentations()) if self.tta is not None else 1)
        with views_postprocess(self.model, self.params, n_views):  # fragments: decayed once, in the merge
            boxes, scores, classes, extras, is_full = self._views_detections(image, views, sx, sy)
        if len(boxes) == 1:  # one tile covering the image: the model's own detections, unchanged
            b, s, c = boxes[0], scores[0], classes[0]
        else:
            b, s, c = merge_detections(boxes, scores, classes, (h, w), self.options["merge"], self.params,
                                       wbf_iou_thresh=self.options["wbf_iou_thresh"])
        ret = {"instances": detections_to_instances((h, w), b, s, c)}
        full = [e for e, f in zip(extras, is_full) if f]
        if full:  # image-level outputs: the whole image's view(s)
            ret.update(mean_scalars(full))
        else:  # the most defective tile
            for k, v in mean_scalars(extras[:1]).items():
                ret[k] = max(float(e[k]) for e in extras if isinstance(e.get(k), (int, float)))
        return ret
