"""DefectStandardROIHeads / DefectCascadeROIHeads: parity with Detectron2's stock heads, the IoU branch,
OHEM, any number of cascade stages, box-loss types, config errors, and the configs that use them."""
import copy
import math
import os

import pytest
import torch
import torchvision
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import d2_defects  # noqa: F401
from d2_defects.engine.launch import load_config
from d2_defects.modeling.roi_heads.iou_branch import IoUFastRCNNOutputLayers, rescore_with_iou
from d2_defects.modeling.roi_heads.ohem import per_proposal_losses, select_hard_examples

from conftest import ROOT, SMALL_CONFIG, TINY_OPTS

SYN = os.path.join(ROOT, "configs", "synthetic")
LOSS_TYPES = ["smooth_l1", "giou", "diou", "ciou"]


def tiny_cfg(config=SMALL_CONFIG, opts=()):
    cfg = load_config(config, TINY_OPTS + list(opts))
    return cfg


@pytest.fixture(scope="module")
def batches(synthetic_root):
    """Mapped training dicts of the tiny dataset (deterministic resize, no flip), in batches of 2."""
    mapper = DatasetMapper(is_train=True, augmentations=[T.ResizeShortestEdge(96, 160)], image_format="BGR")
    dicts = [mapper(copy.deepcopy(d)) for d in DatasetCatalog.get("tiny_defects_train")[:8]]
    return [dicts[i:i + 2] for i in range(0, len(dicts), 2)]


def train_steps(model, batches, steps, lr=0.005):
    """Plain SGD steps; returns the list of loss dicts (floats). Fails on a non-finite loss."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    history = []
    with EventStorage():
        for i in range(steps):
            losses = model(batches[i % len(batches)])
            total = sum(losses.values())
            assert torch.isfinite(total), {k: float(v) for k, v in losses.items()}
            opt.zero_grad()
            total.backward()
            opt.step()
            history.append({k: float(v) for k, v in losses.items()})
    return history


def stock_and_ours(opts, stock_name, our_name, config=SMALL_CONFIG):
    """Two models from the same config but different ROI heads, with identical weights."""
    torch.manual_seed(0)
    stock = build_model(tiny_cfg(config, list(opts) + ["MODEL.ROI_HEADS.NAME", stock_name]))
    ours = build_model(tiny_cfg(config, list(opts) + ["MODEL.ROI_HEADS.NAME", our_name]))
    ours.load_state_dict(stock.state_dict(), strict=True)
    return stock, ours


def assert_same_training_and_inference(stock, ours, batch):
    stock.train(), ours.train()
    with EventStorage():
        torch.manual_seed(1)
        ls = stock(batch)
        torch.manual_seed(1)
        lo = ours(batch)
    assert ls.keys() == lo.keys()
    for k in ls:
        assert torch.equal(ls[k], lo[k]), (k, ls[k], lo[k])
    sum(ls.values()).backward()
    sum(lo.values()).backward()
    for (n, a), (_, b) in zip(stock.named_parameters(), ours.named_parameters()):
        if a.grad is not None or b.grad is not None:
            assert torch.equal(a.grad, b.grad), n
    stock.eval(), ours.eval()
    inputs = [{"image": d["image"]} for d in batch]
    with torch.no_grad():
        os_, oo = stock(inputs), ours(inputs)
    n = 0
    for a, b in zip(os_, oo):
        a, b = a["instances"], b["instances"]
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)
        n += len(a)
    assert n > 0  # the comparison covered actual detections
    return ls


# ----------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("loss_type", ["smooth_l1", "ciou"])
def test_cascade_parity_with_stock_head(batches, loss_type):
    stock, ours = stock_and_ours(["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", loss_type], "CascadeROIHeads",
                                 "DefectCascadeROIHeads")
    assert_same_training_and_inference(stock, ours, batches[0])


def test_four_stage_cascade_parity_with_stock_head(batches):
    """4 stages (IoU 0.5-0.8): the stage loop and the score average over stages are the stock ones."""
    stock, ours = stock_and_ours([], "CascadeROIHeads", "DefectCascadeROIHeads",
                                 config=os.path.join(SYN, "cascade_4stage_r18_cpu.yaml"))
    assert ours.roi_heads.num_cascade_stages == 4
    assert_same_training_and_inference(stock, ours, batches[0])


@pytest.mark.parametrize("loss_type", ["smooth_l1"])
def test_standard_parity_with_stock_head(batches, loss_type):
    opts = ["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "False", "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", loss_type]
    stock, ours = stock_and_ours(opts, "StandardROIHeads", "DefectStandardROIHeads")
    assert_same_training_and_inference(stock, ours, batches[0])


def test_box_reg_loss_type_is_honoured():
    """Every stage of our heads uses BBOX_REG_LOSS_TYPE; the giou value matches fvcore's giou_loss."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.roi_heads import build_roi_heads
    from fvcore.nn import giou_loss

    shapes = {f"p{i}": ShapeSpec(channels=64, stride=2 ** i) for i in range(2, 7)}
    prop = _proposals_with_gt(n=30)
    x = torch.randn(len(prop), 256)
    values = {}
    for loss_type in LOSS_TYPES:
        for name in ("DefectCascadeROIHeads", "DefectStandardROIHeads"):
            torch.manual_seed(0)
            heads = build_roi_heads(tiny_cfg(SMALL_CONFIG, ["MODEL.ROI_HEADS.NAME", name,
                                                             "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", loss_type]), shapes)
            predictors = heads.box_predictor if name == "DefectCascadeROIHeads" else [heads.box_predictor]
            assert all(p.box_reg_loss_type == loss_type for p in predictors)
            p = predictors[-1]
            preds = (p.cls_score(x), p.bbox_pred(x) * 50)  # far from zero deltas, so the loss types differ
            with EventStorage():
                values[loss_type, name] = p.losses(preds, [prop])["loss_box_reg"]
            if loss_type == "giou":
                fg = prop.gt_classes < 6
                boxes = p.box2box_transform.apply_deltas(preds[1][fg], prop.proposal_boxes.tensor[fg])
                expected = giou_loss(boxes, prop.gt_boxes.tensor[fg], reduction="sum") / len(prop)
                torch.testing.assert_close(values[loss_type, name], expected)
    for name in ("DefectCascadeROIHeads", "DefectStandardROIHeads"):
        assert len({float(values[t, name]) for t in LOSS_TYPES}) == len(LOSS_TYPES)


def test_equal_stage_score_weights_are_the_plain_mean(batches):
    stock, ours = stock_and_ours(["MODEL.ROI_BOX_CASCADE_HEAD.STAGE_SCORE_WEIGHTS", "[2.0, 2.0, 2.0]"],
                                 "CascadeROIHeads", "DefectCascadeROIHeads")
    inputs = [{"image": d["image"]} for d in batches[0]]
    stock.eval(), ours.eval()
    with torch.no_grad():
        a, b = stock(inputs)[0]["instances"], ours(inputs)[0]["instances"]
    assert len(a) > 0
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-6)  # up to rounding


def _predictors(model):
    p = model.roi_heads.box_predictor
    return list(p) if isinstance(p, torch.nn.ModuleList) else [p]


def _spread_predictions(model, seed=0):
    """Larger random class (and IoU) layers than the init, so that stages disagree and rescoring reorders."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in _predictors(model):
            for layer in [p.cls_score] + ([p.iou_pred] if hasattr(p, "iou_pred") else []):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.3)


def _run_recorded(model, inputs, monkeypatch):
    """
    Inference of ``model`` on ``inputs``, recording the proposal boxes of every box-head pass (the box
    pooler's input), every box predictor's output, and the (boxes, scores) given to the postprocessing
    (a spy around the project's ``detection_inference``, which it calls unchanged).
    """
    from d2_defects.modeling.roi_heads import cascade, fast_rcnn, iou_branch

    rec = {"boxes": [], "preds": [], "post": []}
    heads = model.roi_heads
    hooks = [heads.box_pooler.register_forward_pre_hook(
        lambda m, args: rec["boxes"].append([b.tensor.clone() for b in args[1]]))]
    hooks += [p.register_forward_hook(lambda m, i, out: rec["preds"].append(out)) for p in _predictors(model)]
    real = fast_rcnn.detection_inference

    def spy(boxes, scores, image_shapes, params):
        rec["post"].append(([b.clone() for b in boxes], [s.clone() for s in scores], image_shapes, params))
        return real(boxes, scores, image_shapes, params)

    for module in (cascade, fast_rcnn, iou_branch):
        monkeypatch.setattr(module, "detection_inference", spy)
    model.eval()
    try:
        with torch.no_grad():
            outputs = [o["instances"] for o in model(inputs)]
    finally:
        for h in hooks:
            h.remove()
    assert len(rec["post"]) == 1 and len(rec["preds"]) == len(rec["boxes"]) == len(_predictors(model))
    return outputs, rec


def _last_stage_boxes(model, rec):
    """Oracle boxes: the last predictor's deltas applied to its proposals, per image."""
    b2b = _predictors(model)[-1].box2box_transform
    boxes = torch.cat(rec["boxes"][-1])
    return b2b.apply_deltas(rec["preds"][-1][1], boxes).split([len(b) for b in rec["boxes"][-1]])


def _stock_postprocess(model, boxes, scores, image_shapes):
    """Detectron2's fast_rcnn_inference with the model's thresholds (soft-NMS is off in these tests)."""
    from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference

    p = _predictors(model)[-1]
    assert not p.postprocess.soft_nms and p.postprocess.score_thresh_per_class is None
    return fast_rcnn_inference(boxes, scores, image_shapes, p.test_score_thresh, p.test_nms_thresh,
                               p.test_topk_per_image)


def _assert_same_detections(a, b):
    n = 0
    for x, y in zip(a, b):
        assert torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor)
        assert torch.equal(x.scores, y.scores) and torch.equal(x.pred_classes, y.pred_classes)
        n += len(x)
    assert n > 0  # the comparison covered actual detections


@pytest.mark.parametrize("weights", [[0.0, 0.0, 1.0], [1.0, 2.0, 3.0]])
def test_stage_score_weights(batches, monkeypatch, weights):
    """Oracle: the weighted mean of the stages' softmax probabilities, computed here from the outputs of the
    stage predictors; the detections are Detectron2's fast_rcnn_inference of those scores."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(SMALL_CONFIG, ["MODEL.ROI_BOX_CASCADE_HEAD.STAGE_SCORE_WEIGHTS", str(weights)]))
    _spread_predictions(model)
    inputs = [{"image": d["image"]} for d in batches[0]]
    outputs, rec = _run_recorded(model, inputs, monkeypatch)
    sizes = [len(b) for b in rec["boxes"][-1]]
    probs = [torch.softmax(p[0], dim=1) for p in rec["preds"]]
    expected = (sum(w * p for w, p in zip(weights, probs)) / sum(weights)).split(sizes)
    plain_mean = (sum(probs) / len(probs)).split(sizes)
    assert not torch.allclose(expected[0], plain_mean[0], atol=1e-3)  # the weights matter here
    boxes, scores, image_shapes, _ = rec["post"][0]
    for got, exp, b, b_exp in zip(scores, expected, boxes, _last_stage_boxes(model, rec)):
        torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-7)
        assert torch.equal(b, b_exp)
    # the detections are the stock postprocessing of exactly those scores
    _assert_same_detections(outputs, _stock_postprocess(model, boxes, scores, image_shapes)[0])
    if weights == [0.0, 0.0, 1.0]:  # the last stage's probabilities alone
        _assert_same_detections(outputs, _stock_postprocess(model, _last_stage_boxes(model, rec),
                                                             probs[-1].split(sizes), image_shapes)[0])


@pytest.mark.parametrize("config", ["faster_iou_r18_cpu.yaml", "cascade_iou_r18_cpu.yaml"])
def test_iou_rescoring_at_model_level(batches, monkeypatch, config):
    """SCORE_ALPHA 0: exactly the detections of the same weights without the branch. SCORE_ALPHA 0.5: the
    scores given to NMS are sqrt(cls * iou), cls (the stage mean in the cascade) and iou (the last stage's
    sigmoid) computed here from the predictors' outputs."""
    path = os.path.join(SYN, config)
    torch.manual_seed(0)
    alpha0 = build_model(tiny_cfg(path, ["MODEL.ROI_BOX_HEAD.IOU_BRANCH.SCORE_ALPHA", "0.0"]))
    _spread_predictions(alpha0)
    plain = build_model(tiny_cfg(path, ["MODEL.ROI_BOX_HEAD.IOU_BRANCH.ENABLED", "False"]))
    missing, unexpected = plain.load_state_dict(alpha0.state_dict(), strict=False)
    assert not missing and unexpected and all(".iou_pred." in k for k in unexpected)
    alpha5 = build_model(tiny_cfg(path, ["MODEL.ROI_BOX_HEAD.IOU_BRANCH.SCORE_ALPHA", "0.5"]))
    alpha5.load_state_dict(alpha0.state_dict(), strict=True)
    inputs = [{"image": d["image"]} for d in batches[0]]
    plain.eval(), alpha0.eval()
    with torch.no_grad():
        _assert_same_detections([o["instances"] for o in alpha0(inputs)], [o["instances"] for o in plain(inputs)])

    outputs, rec = _run_recorded(alpha5, inputs, monkeypatch)
    sizes = [len(b) for b in rec["boxes"][-1]]
    cls = sum(torch.softmax(p[0], dim=1) for p in rec["preds"]) / len(rec["preds"])
    iou = torch.sigmoid(rec["preds"][-1][2])
    expected = cls.clone()
    expected[:, :-1] = torch.sqrt(cls[:, :-1] * iou[:, None])
    assert not torch.allclose(expected, cls, atol=1e-3)
    boxes, scores, image_shapes, _ = rec["post"][0]
    for got, exp, b, b_exp in zip(scores, expected.split(sizes), boxes, _last_stage_boxes(alpha5, rec)):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-7)
        assert torch.equal(b, b_exp)
    stock, kept = _stock_postprocess(alpha5, boxes, scores, image_shapes)
    _assert_same_detections(outputs, stock)
    for out, k, i in zip(outputs, kept, iou.split(sizes)):
        assert torch.equal(out.pred_ious, i[k])


# --------------------------------------------------------------------------------------- stages, configs
def test_four_stage_cascade_from_config():
    cfg = tiny_cfg(os.path.join(SYN, "cascade_4stage_r18_cpu.yaml"))
    model = build_model(cfg)
    heads = model.roi_heads
    assert type(heads).__name__ == "DefectCascadeROIHeads" and heads.num_cascade_stages == 4
    assert [m.thresholds[1] for m in heads.proposal_matchers] == [0.5, 0.6, 0.7, 0.8]
    assert [p.box2box_transform.weights[0] for p in heads.box_predictor] == [10.0, 20.0, 30.0, 40.0]


@pytest.mark.parametrize("config,opts", [
    ("cascade_4stage_r18_cpu.yaml", ["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "smooth_l1"]),
    ("cascade_4stage_r18_cpu.yaml", ["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "giou"]),
    ("cascade_4stage_r18_cpu.yaml", ["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "diou"]),
    ("cascade_4stage_r18_cpu.yaml", ["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "ciou"]),
    ("cascade_3stage_r18_cpu.yaml", []),
    ("cascade_iou_r18_cpu.yaml", ["MODEL.ROI_BOX_HEAD.IOU_BRANCH.LOSS_TYPE", "smooth_l1"]),
    ("faster_iou_r18_cpu.yaml", []),
    ("cascade_iou_r18_cpu.yaml", ["MODEL.ROI_HEADS.SAMPLER", "ohem"]),
    ("faster_iou_r18_cpu.yaml", ["MODEL.ROI_HEADS.SAMPLER", "ohem"]),
], ids=lambda x: x if isinstance(x, str) else "-".join(x[1::2]) or "default")
def test_configs_train_without_nan(batches, config, opts):
    torch.manual_seed(0)
    cfg = tiny_cfg(os.path.join(SYN, config), opts)
    model = build_model(cfg)
    history = train_steps(model, [b[:1] for b in batches], steps=2)
    stages = cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS if "Cascade" in cfg.MODEL.ROI_HEADS.NAME else [None]
    suffixes = [f"_stage{k}" for k in range(len(stages))] if stages[0] is not None else [""]
    for s in suffixes:
        assert f"loss_box_reg{s}" in history[-1]
        assert (f"loss_iou{s}" in history[-1]) == cfg.MODEL.ROI_BOX_HEAD.IOU_BRANCH.ENABLED
    assert all(math.isfinite(v) for h in history for v in h.values())
    model.eval()
    with torch.no_grad():
        out = model([{"image": d["image"]} for d in batches[0]])
    for o in out:
        assert torch.isfinite(o["instances"].scores).all()
        if cfg.MODEL.ROI_BOX_HEAD.IOU_BRANCH.ENABLED:
            ious = o["instances"].pred_ious
            assert ious.shape == o["instances"].scores.shape and ((ious >= 0) & (ious <= 1)).all()


def test_iou_branch_stages_subset(batches):
    cfg = tiny_cfg(os.path.join(SYN, "cascade_iou_r18_cpu.yaml"), ["MODEL.ROI_BOX_HEAD.IOU_BRANCH.STAGES", "[2]"])
    model = build_model(cfg)
    assert [hasattr(p, "iou_pred") for p in model.roi_heads.box_predictor] == [False, False, True]
    losses = train_steps(model, [batches[0][:1]], steps=1)[0]
    assert [k for k in losses if k.startswith("loss_iou")] == ["loss_iou_stage2"]


@pytest.mark.parametrize("opts,key", [
    (["MODEL.ROI_BOX_CASCADE_HEAD.IOUS", "(0.5, 0.6, 0.7, 0.8)"], "BBOX_REG_WEIGHTS"),
    (["MODEL.ROI_BOX_CASCADE_HEAD.STAGE_SCORE_WEIGHTS", "[1.0, 1.0]"], "STAGE_SCORE_WEIGHTS"),
    (["MODEL.ROI_HEADS.SAMPLER", "hard"], "MODEL.ROI_HEADS.SAMPLER"),
    (["MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "iou"], "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE"),
    (["MODEL.ROI_BOX_HEAD.IOU_BRANCH.LOSS_TYPE", "l2"], "MODEL.ROI_BOX_HEAD.IOU_BRANCH.LOSS_TYPE"),
    (["MODEL.ROI_BOX_HEAD.IOU_BRANCH.SCORE_ALPHA", "1.5"], "MODEL.ROI_BOX_HEAD.IOU_BRANCH.SCORE_ALPHA"),
    (["MODEL.ROI_BOX_HEAD.IOU_BRANCH.STAGES", "[3]"], "MODEL.ROI_BOX_HEAD.IOU_BRANCH.STAGES"),
])
def test_config_errors_name_the_key(opts, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_model(tiny_cfg(SMALL_CONFIG, opts))


# -------------------------------------------------------------------------------------------- IoU branch
def _proposals_with_gt(n=40, seed=0, num_classes=3):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 50
    wh = torch.rand(n, 2, generator=g) * 30 + 5
    boxes = torch.cat([xy, xy + wh], 1)
    gt = boxes + torch.randn(n, 4, generator=g) * 3
    gt[:, 2:] = torch.maximum(gt[:, 2:], gt[:, :2] + 1)
    p = Instances((100, 100), proposal_boxes=Boxes(boxes), gt_boxes=Boxes(gt),
                  gt_classes=torch.randint(0, num_classes + 1, (n,), generator=g))
    return p


def test_iou_loss_on_foreground_only_with_detached_target():
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.box_regression import Box2BoxTransform

    torch.manual_seed(0)
    head = IoUFastRCNNOutputLayers(ShapeSpec(channels=16), box2box_transform=Box2BoxTransform((10, 10, 5, 5)),
                                   num_classes=3, cls_agnostic_bbox_reg=True, iou_loss_type="bce")
    prop = _proposals_with_gt()
    x = torch.randn(len(prop), 16)
    scores, deltas, logits = head(x)
    deltas = deltas.detach().requires_grad_()
    logits = logits.detach().requires_grad_()
    with EventStorage():
        loss = head.losses((scores, deltas, logits), [prop])["loss_iou"]
    fg = prop.gt_classes < 3
    pred = head.box2box_transform.apply_deltas(deltas.detach(), prop.proposal_boxes.tensor)
    target = torchvision.ops.box_iou(pred, prop.gt_boxes.tensor).diagonal()[fg]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits.detach()[fg], target)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert (logits.grad[~fg] == 0).all() and (logits.grad[fg] != 0).all()
    assert deltas.grad is None or (deltas.grad == 0).all()  # the target is detached


def test_rescore_with_iou():
    s = torch.tensor([[0.64, 0.2, 0.16], [0.25, 0.25, 0.5]])
    iou = torch.tensor([0.81, 0.0])
    assert torch.equal(rescore_with_iou(s, iou, 0.0), s)
    r = rescore_with_iou(s, iou, 0.5)
    torch.testing.assert_close(r[0, :2], torch.tensor([0.72, (0.2 * 0.81) ** 0.5]))
    assert (r[1, :2] == 0).all() and torch.equal(r[:, 2], s[:, 2])


def _pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _scenes(n, seed, size=128):
    """Feature maps (16 channels draw the objects: a mask and the distances to the sides; the rest is noise), gt Instances and jittered proposals."""
    g = torch.Generator().manual_seed(seed)
    strides = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
    feats = {k: torch.randn(n, 64, size // s, size // s, generator=g) * 0.1 for k, s in strides.items()}
    targets, proposals = [], []
    for i in range(n):
        xy = torch.rand(3, 2, generator=g) * size * 0.6
        gt = torch.cat([xy, xy + torch.rand(3, 2, generator=g) * size * 0.3 + 12], 1).clamp(max=size - 1)
        for k, s in strides.items():
            for b in gt:
                x0, y0, x1, y1 = (b / s).round().long().tolist()
                ys, xs = torch.meshgrid(torch.arange(y0, y1 + 1.0), torch.arange(x0, x1 + 1.0), indexing="ij")
                w, h = x1 - x0 + 1.0, y1 - y0 + 1.0
                f = feats[k][i, :, y0:y1 + 1, x0:x1 + 1]  # (only the part inside the feature map)
                ys, xs = ys[: f.shape[1], : f.shape[2]], xs[: f.shape[1], : f.shape[2]]
                # distances to the object's sides (as in FCOS targets) and a mask
                f[0], f[1], f[2], f[3] = (xs - x0) / w, (x1 - xs) / w, (ys - y0) / h, (y1 - ys) / h
                f[4:16] = 1.0
        wh = (gt[:, 2:] - gt[:, :2]).repeat_interleave(30, 0)
        jit = gt.repeat_interleave(30, 0) + torch.randn(90, 4, generator=g) * wh.repeat(1, 2) * 0.25
        jit[:, 2:] = torch.maximum(jit[:, 2:], jit[:, :2] + 2)
        boxes = Boxes(jit)
        boxes.clip((size, size))
        targets.append(Instances((size, size), gt_boxes=Boxes(gt), gt_classes=torch.randint(0, 6, (3,), generator=g)))
        proposals.append(Instances((size, size), proposal_boxes=boxes, objectness_logits=torch.zeros(90)))
    return feats, proposals, targets


def _fg_pred_and_true_ious(heads, feats, proposals, targets):
    """Predicted IoU and true IoU (best IoU of the regressed box with a gt box) of the proposals whose
    regressed box overlaps a gt box by >= 0.5 (the population the branch is trained on)."""
    predictor = heads.box_predictor
    with torch.no_grad():
        x = heads.box_pooler([feats[f] for f in heads.box_in_features], [p.proposal_boxes for p in proposals])
        preds = predictor(heads.box_head(x))
        pred = torch.cat(predictor.predict_ious(preds, proposals))
        true = torch.cat([torchvision.ops.box_iou(b, t.gt_boxes.tensor).max(1).values
                          for b, t in zip(predictor.predict_boxes(preds, proposals), targets)])
    fg = true >= 0.5
    return pred[fg], true[fg]


def test_iou_branch_learns():
    """The branch learns the IoU of the regressed boxes: after a short training, on held-out scenes, the
    predicted IoU correlates with the true IoU, which it does not before training. (The correlation on the
    synthetic val set after a longer training is in BENCHMARKS.md.)"""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.roi_heads import build_roi_heads

    torch.manual_seed(0)
    # Class-agnostic boxes (the classes of these scenes cannot be learned) and no regression loss, so that
    # the regressed boxes keep the spread of IoUs of the jittered proposals instead of collapsing onto the gt.
    cfg = tiny_cfg(os.path.join(SYN, "faster_iou_r18_cpu.yaml"), [
        "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True", "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", "0.0",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "128", "MODEL.ROI_HEADS.POSITIVE_FRACTION", "0.5",
        "MODEL.ROI_BOX_HEAD.IOU_BRANCH.LOSS_WEIGHT", "5.0"])
    shapes = {f"p{i}": ShapeSpec(channels=64, stride=2 ** i) for i in range(2, 6)}
    heads = build_roi_heads(cfg, shapes)
    held_out = _scenes(4, seed=10_000)
    r0 = _pearson(*_fg_pred_and_true_ious(heads, *held_out))
    opt = torch.optim.Adam(heads.parameters(), lr=1e-3)
    heads.train()
    with EventStorage():
        for step in range(100):
            _, losses = heads(None, *_scenes(2, seed=step))
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
    heads.eval()
    pred, true = _fg_pred_and_true_ious(heads, *held_out)
    assert len(pred) >= 100
    r = _pearson(pred, true)
    assert r > 0.25 and r > r0 + 0.2, (r, r0)


# -------------------------------------------------------------------------------------------------- OHEM
def test_select_hard_examples_counts_and_order():
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 10, (200,), generator=g)
    labels = torch.where(raw < 3, raw, 3)  # 3 = background
    labels[raw == 9] = -1  # ignored
    losses = torch.rand(200, generator=g)
    keep = select_hard_examples(labels, losses, batch_size_per_image=64, positive_fraction=0.25, num_classes=3)
    fg, bg = keep[labels[keep] < 3], keep[labels[keep] == 3]
    assert (labels[keep] >= 0).all() and len(fg) == 16 and len(bg) == 48 and len(set(keep.tolist())) == 64
    fg_all, bg_all = torch.nonzero((labels >= 0) & (labels < 3)).squeeze(1), torch.nonzero(labels == 3).squeeze(1)
    assert set(fg.tolist()) == set(fg_all[losses[fg_all].argsort(descending=True)[:16]].tolist())
    assert set(bg.tolist()) == set(bg_all[losses[bg_all].argsort(descending=True)[:48]].tolist())
    # few foreground: all of them, the rest is background
    labels2 = torch.full((100,), 3)
    labels2[:5] = 0
    keep2 = select_hard_examples(labels2, torch.rand(100), 64, 0.25, 3)
    assert len(keep2) == 64 and set(range(5)) <= set(keep2.tolist())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_per_proposal_losses_match_stock_losses(loss_type):
    """Oracle: the stock predictor's ``losses`` on a batch of one proposal."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.box_regression import Box2BoxTransform

    torch.manual_seed(0)
    head = FastRCNNOutputLayers(ShapeSpec(channels=16), box2box_transform=Box2BoxTransform((10, 10, 5, 5)),
                                num_classes=3, cls_agnostic_bbox_reg=False, box_reg_loss_type=loss_type,
                                loss_weight={"loss_box_reg": 2.0})
    prop = _proposals_with_gt(n=30)
    preds = head(torch.randn(len(prop), 16) * 3)
    got = per_proposal_losses(head, preds, [prop])
    with EventStorage():
        expected = torch.stack([sum(head.losses((preds[0][i:i + 1], preds[1][i:i + 1]), [prop[i:i + 1]]).values())
                                for i in range(len(prop))])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,opts", [
    ("DefectCascadeROIHeads", []),
    ("DefectStandardROIHeads", ["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "False"]),
], ids=["cascade", "standard"])
def test_ohem_selects_top_loss_proposals(batches, name, opts):
    cfg = tiny_cfg(SMALL_CONFIG, ["MODEL.ROI_HEADS.NAME", name, "MODEL.ROI_HEADS.SAMPLER", "ohem", *opts])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    batch = batches[0]
    images = model.preprocess_image(batch)
    targets = [d["instances"] for d in batch]
    with EventStorage():
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, targets)
        heads = model.roi_heads
        labelled = heads.label_and_sample_proposals(proposals, targets)
        # every non-ignored proposal is kept for ranking (more than a batch)
        assert sum(len(p) for p in labelled) > 2 * heads.batch_size_per_image
        head = heads.box_head[0] if name.startswith("DefectCascade") else heads.box_head
        predictor = heads.box_predictor[0] if name.startswith("DefectCascade") else heads.box_predictor
        feats = [features[f] for f in heads.box_in_features]
        selected = heads._select_hard_examples(feats, labelled, head, predictor)
        with torch.no_grad():
            preds_all = predictor(head(heads.box_pooler(feats, [p.proposal_boxes for p in labelled])))
        start = 0
        for p_all, p_sel in zip(labelled, selected):
            preds = [x[start:start + len(p_all)] for x in preds_all]
            start += len(p_all)
            with torch.no_grad():
                # oracle: the stock losses on each proposal alone
                loss = torch.stack([sum(FastRCNNOutputLayers.losses(predictor, (preds[0][i:i + 1], preds[1][i:i + 1]),
                                                                    [p_all[i:i + 1]]).values())
                                    for i in range(len(p_all))])
            fg = p_all.gt_classes < heads.num_classes
            n_fg = min(int(heads.batch_size_per_image * heads.positive_fraction), int(fg.sum()))
            n_bg = min(heads.batch_size_per_image - n_fg, int((~fg).sum()))
            assert len(p_sel) == n_fg + n_bg
            sel_fg = p_sel.gt_classes < heads.num_classes
            assert int(sel_fg.sum()) == n_fg
            # the selected foreground (background) losses are the n_fg (n_bg) largest
            for mask_all, mask_sel, n in ((fg, sel_fg, n_fg), (~fg, ~sel_fg, n_bg)):
                top = loss[mask_all].sort(descending=True).values[:n]
                sel_boxes = p_sel.proposal_boxes.tensor[mask_sel]
                idx = [int(torch.nonzero((p_all.proposal_boxes.tensor == b).all(1))[0]) for b in sel_boxes]
                torch.testing.assert_close(loss[idx].sort(descending=True).values, top, rtol=1e-5, atol=1e-6)
        # the box head trains on exactly that selection (stage 0 of the cascade)
        _, losses = heads(images, features, proposals, targets)
        with torch.no_grad():
            preds_sel = predictor(head(heads.box_pooler(feats, [p.proposal_boxes for p in selected])))
            expected = FastRCNNOutputLayers.losses(predictor, preds_sel, selected)
    suffix = "_stage0" if name.startswith("DefectCascade") else ""
    for k, v in expected.items():
        torch.testing.assert_close(losses[k + suffix], v, rtol=1e-5, atol=1e-6)
