"""
Turn weights from other libraries, or a checkpoint of another head layout, into state dicts this project's
models load (``MODEL.WEIGHTS``). Pure state-dict work (no model is built here); ``tools/convert_weights.py``
is the command line.

- :func:`torchvision_resnet_to_d2`: torchvision ResNet / ResNeXt / Wide ResNet ImageNet weights -> Detectron2's
  ``ResNet`` names (``stem.conv1``, ``res2.0.conv1.norm``, ``res2.0.shortcut``), plus the config lines the
  checkpoint needs (depth, groups, stride in the 3x3 conv, RGB input and torchvision's pixel mean/std).
- :func:`timm_to_d2`: a timm classification checkpoint -> the project's timm backbone (``TimmBackbone.model``).
- :func:`remap_classes`: a Detectron2 / d2_defects detector checkpoint -> another class list (R-CNN box
  predictors with the background row last, class-specific box regression rows following their classes, FCOS
  classifier convs); new classes get the heads' own initialisation.
- :func:`set_cascade_stages`: copy the last cascade stage into new ones, or drop stages.
"""
import re
from collections import OrderedDict

import torch

from ..utils.errors import CheckpointError

__all__ = [
    "read_state_dict",
    "torchvision_resnet_to_d2",
    "timm_to_d2",
    "remap_classes",
    "set_cascade_stages",
    "parse_class_map",
    "TORCHVISION_PIXEL_MEAN",
    "TORCHVISION_PIXEL_STD",
]

# torchvision's ImageNet normalisation, RGB order, in 0-255 units (Detectron2's PIXEL_MEAN/STD convention)
TORCHVISION_PIXEL_MEAN = [123.675, 116.28, 103.53]
TORCHVISION_PIXEL_STD = [58.395, 57.12, 57.375]
_DEPTHS = {("basic", (2, 2, 2, 2)): 18, ("basic", (3, 4, 6, 3)): 34, ("bottleneck", (3, 4, 6, 3)): 50,
           ("bottleneck", (3, 4, 23, 3)): 101, ("bottleneck", (3, 8, 36, 3)): 152}


def read_state_dict(path):
    """
    Read a checkpoint file into a flat ``{name: Tensor}`` and the other top-level entries of the file.

    ``.safetensors`` through safetensors; ``.pkl`` (Detectron2 model zoo) through the project's data-only
    unpickler; anything else with ``torch.load(weights_only=True)``. Wrappers are unwrapped: ``{"model": sd}``
    (Detectron2), ``{"state_dict": sd}`` / ``{"model_state": sd}``, and a ``module.`` prefix (DDP).

    Returns:
        (OrderedDict[str, Tensor], dict): the weights and the file's other top-level keys.
    """
    import os

    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path)
        elif path.endswith(".pkl"):
            from ..checkpoint import load_pkl_weights

            obj = load_pkl_weights(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # corrupt, truncated or not a checkpoint at all: one line naming the file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from None
    extra = {}
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state"):
            if key in obj and isinstance(obj[key], dict):
                extra = {k: v for k, v in obj.items() if k != key}
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: holds no state dict (expected a mapping of parameter names to tensors)")
    sd = OrderedDict()
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            try:
                import numpy as np

                v = torch.as_tensor(np.asarray(v))
            except (TypeError, ValueError):
                raise CheckpointError(f"{path}: entry {k!r} is not a tensor") from None
        sd[k[len("module."):] if k.startswith("module.") else k] = v
    return sd, extra


# ------------------------------------------------------------------------------------- torchvision
_TV_STEM = {"conv1.weight": "stem.conv1.weight"}
_TV_BN = re.compile(r"^bn1\.(weight|bias|running_mean|running_var)$")
_TV_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(.+)$")


def torchvision_resnet_to_d2(sd, prefix="backbone.bottom_up."):
    """
    Rename a torchvision ``resnet*`` / ``resnext*`` / ``wide_resnet*`` state dict to Detectron2's ``ResNet``.

    Args:
        sd (dict[str, Tensor]): the torchvision state dict (``fc.*`` is dropped, as are BN's
            ``num_batches_tracked`` counters).
        prefix (str): prepended to every name: ``backbone.bottom_up.`` for the FPN models of this project,
            ``backbone.`` for a plain ResNet backbone, ``""`` for the bare ResNet.
    Returns:
        (OrderedDict, list[str]): the renamed weights and the config lines (``KEY VALUE``) the model needs:
        ``MODEL.RESNETS.DEPTH``, ``NUM_GROUPS``, ``WIDTH_PER_GROUP``, ``RES2_OUT_CHANNELS``, ``STRIDE_IN_1X1
        False`` (torchvision strides in the 3x3 conv), ``INPUT.FORMAT RGB`` and torchvision's pixel mean/std.
    """
    out = OrderedDict()
    unknown = []
    for k, v in sd.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        if k in _TV_STEM:
            out[prefix + _TV_STEM[k]] = v
            continue
        m = _TV_BN.match(k)
        if m:
            out[f"{prefix}stem.conv1.norm.{m.group(1)}"] = v
            continue
        m = _TV_BLOCK.match(k)
        if not m:
            unknown.append(k)
            continue
        stage, block, part, rest = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        base = f"{prefix}res{stage + 1}.{block}."
        if part.startswith("conv"):
            out[base + f"{part}.{rest}"] = v
        elif part.startswith("bn"):
            out[base + f"conv{part[2:]}.norm.{rest}"] = v
        elif part == "downsample.0":
            out[base + f"shortcut.{rest}"] = v
        else:
            out[base + f"shortcut.norm.{rest}"] = v
    if unknown:
        raise CheckpointError(f"not a torchvision ResNet state dict: unexpected keys {unknown[:5]}"
                              + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""))
    if "conv1.weight" not in sd:
        raise CheckpointError("not a torchvision ResNet state dict: no conv1.weight")
    blocks = [len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
    kind = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    depth = _DEPTHS.get((kind, tuple(blocks)))
    if depth is None:
        raise CheckpointError(f"unknown ResNet layout: {kind} blocks {blocks}")
    lines = [("MODEL.RESNETS.DEPTH", depth), ("MODEL.RESNETS.STRIDE_IN_1X1", False)]
    if kind == "bottleneck":
        width = sd["layer1.0.conv1.weight"].shape[0]
        groups = width // sd["layer1.0.conv2.weight"].shape[1]
        lines += [("MODEL.RESNETS.NUM_GROUPS", groups), ("MODEL.RESNETS.WIDTH_PER_GROUP", width // groups),
                  ("MODEL.RESNETS.RES2_OUT_CHANNELS", sd["layer1.0.conv3.weight"].shape[0])]
    else:
        lines += [("MODEL.RESNETS.NUM_GROUPS", 1), ("MODEL.RESNETS.WIDTH_PER_GROUP", 64),
                  ("MODEL.RESNETS.RES2_OUT_CHANNELS", sd["layer1.0.conv2.weight"].shape[0])]
    lines += [("MODEL.RESNETS.STEM_OUT_CHANNELS", sd["conv1.weight"].shape[0]), ("INPUT.FORMAT", "RGB"),
              ("MODEL.PIXEL_MEAN", TORCHVISION_PIXEL_MEAN), ("MODEL.PIXEL_STD", TORCHVISION_PIXEL_STD)]
    return out, [f"{k} {_cfg_value(v)}" for k, v in lines]


def _cfg_value(v):
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(f"{x:g}" for x in v) + "]"
    return str(v)


# --------------------------------------------------------------------------------------------- timm
def timm_to_d2(sd, backbone_state, prefix="backbone.bottom_up.model."):
    """
    Keep the entries of a timm checkpoint that the project's timm backbone has (same name and shape) and
    rename them for the detector.

    Args:
        sd (dict[str, Tensor]): timm checkpoint (classification model).
        backbone_state (dict[str, Tensor]): ``TimmBackbone.model.state_dict()`` of the configured backbone
            (what the detector holds under ``prefix``).
    Returns:
        (OrderedDict, list[str], list[str]): the weights, the checkpoint keys dropped (classifier, or
        absent from the features-only model), and the backbone keys the checkpoint did not have.
    Raises:
        CheckpointError: when a name matches with another shape (another model variant), or when fewer
            than half of the backbone's entries are found (another architecture).
    """
    out, dropped = OrderedDict(), []
    for k, v in sd.items():
        if k not in backbone_state:
            dropped.append(k)
            continue
        if tuple(backbone_state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"timm checkpoint entry {k} has shape {tuple(v.shape)}, the configured "
                                  f"backbone expects {tuple(backbone_state[k].shape)} (another model variant?)")
        out[prefix + k] = v
    missing = [k for k in backbone_state if k not in sd]
    if len(out) < len(backbone_state) / 2:
        raise CheckpointError(f"the timm checkpoint has only {len(out)} of the backbone's {len(backbone_state)} "
                              "entries: another architecture than MODEL.TIMM.NAME?")
    return out, dropped, missing


# ----------------------------------------------------------------------------------- class surgery
def parse_class_map(text, old_names=None, new_names=None):
    """
    ``"old:new,old:new"`` -> ``{old_index: new_index}``. Entries are indices, or class names when the
    name lists are given (e.g. from two registered datasets' metadata).
    """
    def index(tok, names, side):
        tok = tok.strip()
        if re.fullmatch(r"\d+", tok):
            return int(tok)
        if names is None:
            raise CheckpointError(f"--class-map: {tok!r} is not an index and no {side} class names are known "
                                  f"(give --{side}-dataset)")
        if tok not in names:
            raise CheckpointError(f"--class-map: {side} class {tok!r} is not one of {list(names)}")
        return list(names).index(tok)

    mapping = {}
    for item in [t for t in text.split(",") if t.strip()]:
        if ":" not in item:
            raise CheckpointError(f"--class-map: expected old:new, got {item!r}")
        a, b = item.rsplit(":", 1)
        o, n = index(a, old_names, "old"), index(b, new_names, "new")
        if n in mapping.values():
            raise CheckpointError(f"--class-map: new class {b.strip()!r} is mapped twice")
        mapping[o] = n
    return mapping


def _rcnn_predictors(sd):
    """Prefixes of R-CNN box predictors (``...box_predictor[.k].``) in ``sd``."""
    return sorted({k[: -len("cls_score.weight")] for k in sd if k.endswith("box_predictor.cls_score.weight")
                   or re.search(r"box_predictor\.\d+\.cls_score\.weight$", k)})


def _fcos_heads(sd):
    return sorted({k[: -len("cls_score.weight")] for k in sd
                   if k.endswith("cls_score.weight") and "box_predictor" not in k and sd[k].dim() == 4})


def remap_classes(sd, num_classes, class_map=None, generator=None):
    """
    Re-layout the class-dependent rows of a detector's state dict for ``num_classes`` new classes.

    New class ``j`` takes the rows of the old class ``i`` with ``class_map[i] == j``; new classes no old class
    maps to are initialised as the heads initialise them (R-CNN ``cls_score`` ~ N(0, 0.01), ``bbox_pred`` ~
    N(0, 0.001), biases 0; FCOS classifier ~ N(0, 0.01) with the prior-probability bias of the old
    checkpoint's mean). Without ``class_map`` old class ``i`` stays class ``i`` for ``i < num_classes``.
    The R-CNN background row stays the last row; class-specific box regression rows (4 per class) follow
    their classes; class-agnostic ones (4 rows) are kept as they are.

    Returns:
        (OrderedDict, dict): the new state dict and a summary ``{"old_classes", "new_classes", "map",
        "heads"}``.
    """
    out = OrderedDict(sd)
    heads = []
    old_k = None
    for p in _rcnn_predictors(sd):
        k = sd[p + "cls_score.weight"].shape[0] - 1
        old_k = k if old_k is None else old_k
        heads.append(p.rstrip("."))
    for p in _fcos_heads(sd):
        k = sd[p + "cls_score.weight"].shape[0]
        old_k = k if old_k is None else old_k
        heads.append(p.rstrip(".") or "cls_score")
    if old_k is None:
        raise CheckpointError("no class-dependent head found (no box_predictor.cls_score or FCOS cls_score)")
    if class_map is None:
        class_map = {i: i for i in range(min(old_k, num_classes))}
    for o, n in class_map.items():
        if not 0 <= o < old_k:
            raise CheckpointError(f"--class-map: old class index {o} is outside 0..{old_k - 1}")
        if not 0 <= n < num_classes:
            raise CheckpointError(f"--class-map: new class index {n} is outside 0..{num_classes - 1}")
    src = {n: o for o, n in class_map.items()}
    g = generator or torch.Generator().manual_seed(0)

    def pick(old, rows_per_class, new_rows_fn, extra_rows=0):
        # old: (old_k * r + extra, ...) -> (num_classes * r + extra, ...)
        r = rows_per_class
        parts = []
        for j in range(num_classes):
            if j in src:
                parts.append(old[src[j] * r:(src[j] + 1) * r])
            else:
                parts.append(new_rows_fn(r, old))
        if extra_rows:
            parts.append(old[old.shape[0] - extra_rows:])
        return torch.cat(parts, 0)

    def normal(std):
        return lambda r, old: torch.randn((r,) + tuple(old.shape[1:]), generator=g).to(old.dtype) * std

    def zeros(r, old):
        return torch.zeros((r,) + tuple(old.shape[1:]), dtype=old.dtype)

    for p in _rcnn_predictors(sd):
        out[p + "cls_score.weight"] = pick(sd[p + "cls_score.weight"], 1, normal(0.01), extra_rows=1)
        out[p + "cls_score.bias"] = pick(sd[p + "cls_score.bias"], 1, zeros, extra_rows=1)
        w = sd.get(p + "bbox_pred.weight")
        if w is not None and w.shape[0] == 4 * old_k and old_k > 1:  # class-specific regression
            out[p + "bbox_pred.weight"] = pick(w, 4, normal(0.001))
            out[p + "bbox_pred.bias"] = pick(sd[p + "bbox_pred.bias"], 4, zeros)
    for p in _fcos_heads(sd):
        bias = sd[p + "cls_score.bias"]
        prior = float(bias.mean())
        out[p + "cls_score.weight"] = pick(sd[p + "cls_score.weight"], 1, normal(0.01))
        out[p + "cls_score.bias"] = pick(bias, 1, lambda r, old: torch.full((r,), prior, dtype=old.dtype))
    return out, {"old_classes": old_k, "new_classes": num_classes, "map": dict(sorted(class_map.items())),
                 "heads": heads}


def set_cascade_stages(sd, num_stages):
    """
    Cascade stage count ``num_stages``: drop ``roi_heads.box_head.{k}``/``box_predictor.{k}`` for k >= N, or
    fill new stages with copies of the last stage. The config must list N IoUs and box-regression weights
    (``MODEL.ROI_BOX_CASCADE_HEAD.IOUS`` / ``BBOX_REG_WEIGHTS``).

    Returns:
        (OrderedDict, int): the new state dict and the old stage count.
    """
    pat = re.compile(r"^(roi_heads\.(?:box_head|box_predictor))\.(\d+)\.(.+)$")
    stages = sorted({int(m.group(2)) for k in sd if (m := pat.match(k))})
    if not stages:
        raise CheckpointError("--stages: the checkpoint has no cascade stages (roi_heads.box_head.<k>)")
    old = stages[-1] + 1
    if num_stages < 1:
        raise CheckpointError(f"--stages must be >= 1, got {num_stages}")
    out = OrderedDict()
    for k, v in sd.items():
        m = pat.match(k)
        if m and int(m.group(2)) >= num_stages:
            continue
        out[k] = v
    for s in range(old, num_stages):
        for k, v in sd.items():
            m = pat.match(k)
            if m and int(m.group(2)) == old - 1:
                out[f"{m.group(1)}.{s}.{m.group(3)}"] = v.clone()
    return out, old
