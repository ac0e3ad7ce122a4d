"""Soft-NMS and per-class score thresholds wired into the ROI heads' inference.

Oracles: Detectron2's stock ``StandardROIHeads`` / ``fast_rcnn_inference`` on the same weights and inputs.
"""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import StandardROIHeads, build_roi_heads
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

from d2_defects import add_defects_config
from d2_defects.layers.soft_nms import batched_soft_nms
from d2_defects.modeling.postprocess import PostprocessParams, detection_inference, select_detections
from d2_defects.modeling.roi_heads.fast_rcnn import DefectFastRCNNOutputLayers

NUM_CLASSES = 6
IMAGE_SIZES = [(96, 128), (80, 112)]
SHAPES = {"p2": ShapeSpec(channels=16, stride=4)}


def make_cfg(*opts, agnostic=False):
    cfg = add_defects_config(get_cfg())
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2"
    cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = agnostic
    cfg.TEST.DETECTIONS_PER_IMAGE = 1000  # no cap: compare everything NMS keeps
    cfg.merge_from_list(list(opts))
    return cfg


def build_pair(cfg):
    """Stock StandardROIHeads and the same heads (same weights) with DefectFastRCNNOutputLayers."""
    torch.manual_seed(0)
    stock = build_roi_heads(cfg, SHAPES)
    assert type(stock) is StandardROIHeads
    ours = StandardROIHeads(cfg, SHAPES, box_predictor=DefectFastRCNNOutputLayers(cfg, stock.box_head.output_shape))
    ours.load_state_dict(stock.state_dict())
    return stock.eval(), ours.eval()


def make_inputs(seed=0, n=120):
    g = torch.Generator().manual_seed(seed)
    images = ImageList(torch.rand(2, 3, 96, 128, generator=g), IMAGE_SIZES)
    features = {"p2": torch.rand(2, 16, 24, 32, generator=g)}
    proposals, targets = [], []
    for h, w in IMAGE_SIZES:
        centers = torch.rand(8, 2, generator=g) * torch.tensor([w, h]) * 0.8 + 5
        k = torch.randint(0, 8, (n,), generator=g)
        c = centers[k] + torch.randn(n, 2, generator=g) * 3
        wh = torch.rand(n, 2, generator=g) * 20 + 10
        inst = Instances((h, w))
        inst.proposal_boxes = Boxes(torch.cat([c - wh / 2, c + wh / 2], 1))
        inst.objectness_logits = torch.rand(n, generator=g)
        gt = Instances((h, w))
        gt.gt_boxes = Boxes(torch.cat([centers[:3] - 8, centers[:3] + 8], 1))
        gt.gt_classes = torch.randint(0, NUM_CLASSES, (3,), generator=g)
        proposals.append(inst)
        targets.append(gt)
    return images, features, proposals, targets


def infer(heads, seed=0):
    images, features, proposals, _ = make_inputs(seed)
    with torch.no_grad():
        return heads(images, features, [p[:] for p in proposals])[0]


def assert_same_instances(a, b):
    assert len(a) == len(b)
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_classes, b.pred_classes)


@pytest.mark.parametrize("agnostic", [False, True])
def test_soft_nms_off_is_identical_to_stock(agnostic):
    stock, ours = build_pair(make_cfg(agnostic=agnostic))
    for seed in (0, 1):
        out_stock, out_ours = infer(stock, seed), infer(ours, seed)
        for a, b in zip(out_stock, out_ours):
            assert 0 < len(a) < 120 * NUM_CLASSES  # NMS did suppress something
            assert_same_instances(a, b)


def test_soft_nms_hard_method_is_identical_to_stock():
    cfg = make_cfg("MODEL.SOFT_NMS.ENABLED", True, "MODEL.SOFT_NMS.METHOD", "hard",
                   "MODEL.SOFT_NMS.IOU_THRESHOLD", 0.5, "MODEL.SOFT_NMS.SCORE_THRESHOLD", 0.0,
                   "MODEL.ROI_HEADS.NMS_THRESH_TEST", 0.5)
    stock, ours = build_pair(cfg)
    for a, b in zip(infer(stock), infer(ours)):
        assert_same_instances(a, b)


def _all_candidates(stock, seed=0):
    """Every thresholded, clipped candidate of the stock heads (NMS at IoU 1.0 suppresses nothing)."""
    images, features, proposals, _ = make_inputs(seed)
    with torch.no_grad():
        box_features = stock.box_head(stock.box_pooler([features["p2"]], [p.proposal_boxes for p in proposals]))
        predictions = stock.box_predictor(box_features)
        boxes = stock.box_predictor.predict_boxes(predictions, proposals)
        scores = stock.box_predictor.predict_probs(predictions, proposals)
    return fast_rcnn_inference(boxes, scores, IMAGE_SIZES, stock.box_predictor.test_score_thresh, 1.0, -1)[0]


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_soft_nms_on_matches_operator_on_stock_candidates(method):
    cfg = make_cfg("MODEL.SOFT_NMS.ENABLED", True, "MODEL.SOFT_NMS.METHOD", method,
                   "MODEL.SOFT_NMS.IOU_THRESHOLD", 0.4, "MODEL.SOFT_NMS.SCORE_THRESHOLD", 0.02)
    stock, ours = build_pair(cfg)
    out_stock, out_ours = infer(stock), infer(ours)
    for hard, soft, cand in zip(out_stock, out_ours, _all_candidates(stock)):
        assert len(soft) > len(hard)  # soft-NMS keeps (decayed) boxes that hard NMS removes
        assert torch.equal(soft.pred_boxes.tensor[0], hard.pred_boxes.tensor[0])  # the top box is untouched
        assert torch.equal(soft.scores[0], hard.scores[0])
        keep, new_scores = batched_soft_nms(cand.pred_boxes.tensor, cand.scores, cand.pred_classes, method,
                                            0.5, 0.4, 0.02)
        # same detections (candidate order differs: compare as sets ordered by score)
        assert len(keep) == len(soft)
        torch.testing.assert_close(soft.scores, new_scores, rtol=0, atol=1e-6)
        rows_ref = sorted(zip(cand.pred_classes[keep].tolist(), cand.pred_boxes.tensor[keep].tolist()))
        rows = sorted(zip(soft.pred_classes.tolist(), soft.pred_boxes.tensor.tolist()))
        assert rows == rows_ref
        assert bool((soft.scores <= cand.scores.max()).all())


def test_detections_per_image_still_caps_soft_nms_output():
    cfg = make_cfg("MODEL.SOFT_NMS.ENABLED", True, "TEST.DETECTIONS_PER_IMAGE", 7)
    _, ours = build_pair(cfg)
    for inst in infer(ours):
        assert len(inst) == 7
        assert bool((inst.scores[:-1] >= inst.scores[1:]).all())


def test_score_thresh_per_class_matches_stock_on_masked_scores():
    thresholds = [0.05, 0.9, 0.13, 0.14, 0.05, 0.2]
    cfg = make_cfg("MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS", thresholds)
    stock, ours = build_pair(cfg)
    images, features, proposals, targets = make_inputs(0)
    with torch.no_grad():
        box_features = stock.box_head(stock.box_pooler([features["p2"]], [p.proposal_boxes for p in proposals]))
        predictions = stock.box_predictor(box_features)
        boxes = stock.box_predictor.predict_boxes(predictions, proposals)
        scores = stock.box_predictor.predict_probs(predictions, proposals)
    # oracle: zero the scores at or below their class threshold, then stock inference with threshold 0
    t = torch.tensor(thresholds + [0.0])
    masked = [torch.where(s > t, s, torch.zeros_like(s)) for s in scores]
    ref, _ = fast_rcnn_inference(boxes, masked, IMAGE_SIZES, 0.0, 0.5, 1000)
    out = infer(ours)
    for a, b, s in zip(ref, out, scores):
        assert_same_instances(a, b)
        assert 1 not in b.pred_classes.tolist() and bool((s[:, 1] > 0.12).any())  # class 1 is filtered out
    # all classes at SCORE_THRESH_TEST: same as no per-class list
    _, plain = build_pair(make_cfg("MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS", [0.05] * NUM_CLASSES))
    for a, b in zip(infer(stock), infer(plain)):
        assert_same_instances(a, b)


def test_config_errors_name_the_key_at_build_time():
    cfg = make_cfg("MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS", [0.1, 0.2])
    with pytest.raises(ValueError, match=r"MODEL\.ROI_HEADS\.SCORE_THRESH_PER_CLASS.*K=6"):
        DefectFastRCNNOutputLayers(cfg, ShapeSpec(channels=64))
    with pytest.raises(ValueError, match=r"MODEL\.SOFT_NMS\.METHOD"):
        PostprocessParams.from_config(make_cfg("MODEL.SOFT_NMS.METHOD", "cubic"))
    with pytest.raises(ValueError, match=r"MODEL\.SOFT_NMS\.SIGMA"):
        PostprocessParams.from_config(make_cfg("MODEL.SOFT_NMS.SIGMA", 0.0))
    with pytest.raises(ValueError, match=r"MODEL\.SOFT_NMS\.IOU_THRESHOLD"):
        PostprocessParams.from_config(make_cfg("MODEL.SOFT_NMS.IOU_THRESHOLD", 1.5))
    p = PostprocessParams.from_config(make_cfg("MODEL.SOFT_NMS.ENABLED", True, "MODEL.SOFT_NMS.METHOD", "gaussian"))
    assert (p.soft_nms, p.soft_nms_method, p.soft_nms_sigma, p.score_thresh_per_class) == (True, "gaussian", 0.5, None)
    assert PostprocessParams.from_config(make_cfg(), num_classes=3).topk_per_image == 1000


def test_detection_inference_drops_non_finite_proposals_and_indexes_the_inputs():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 60
    boxes = torch.cat([xy, xy + 20], 1).repeat(1, NUM_CLASSES)
    scores = torch.softmax(torch.randn(50, NUM_CLASSES + 1, generator=g) * 3, dim=1)
    boxes[[4, 9], 2] = float("nan")
    scores[17, 0] = float("inf")
    valid = torch.ones(50, dtype=torch.bool)
    valid[[4, 9, 17]] = False
    for soft in (False, True):
        params = PostprocessParams(score_thresh=0.05, nms_thresh=0.5, topk_per_image=100, soft_nms=soft)
        (inst,), (kept,) = detection_inference([boxes], [scores], [(80, 80)], params)
        assert len(inst) > 0 and not {4, 9, 17} & set(kept.tolist())
        if not soft:
            (ref,), (ref_kept,) = fast_rcnn_inference([boxes[valid]], [scores[valid]], [(80, 80)], 0.05, 0.5, 100)
            assert_same_instances(ref, inst)
            assert torch.equal(kept, torch.nonzero(valid).squeeze(1)[ref_kept])  # indices into the inputs
        # the kept proposal's class score is the detection's (undecayed) score or above it
        assert bool((scores[kept, inst.pred_classes] >= inst.scores).all())


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("reg_classes", [1, NUM_CLASSES])
def test_detection_inference_without_proposals(soft, reg_classes):
    params = PostprocessParams(soft_nms=soft)
    boxes, scores = torch.zeros(0, 4 * reg_classes), torch.zeros(0, NUM_CLASSES + 1)
    (inst,), (kept,) = detection_inference([boxes], [scores], [(32, 32)], params)
    (ref,), (ref_kept,) = fast_rcnn_inference([boxes], [scores], [(32, 32)], 0.05, 0.5, 100)
    assert len(inst) == 0 and kept.numel() == 0
    assert inst.get_fields().keys() == ref.get_fields().keys()
    assert inst.pred_classes.dtype == ref.pred_classes.dtype and inst.scores.dtype == ref.scores.dtype


def test_select_detections_one_image():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(300, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 30], 1)
    scores = torch.rand(300, generator=g)
    classes = torch.randint(0, 3, (300,), generator=g)
    params = PostprocessParams(score_thresh=0.3, nms_thresh=0.5, topk_per_image=20,
                               score_thresh_per_class=[0.3, 0.5, 0.95])
    keep, final = select_detections(boxes, scores, classes, params)
    assert len(keep) == 20 and torch.equal(final, scores[keep])
    assert bool((scores[keep] > torch.tensor([0.3, 0.5, 0.95])[classes[keep]]).all())
    params.soft_nms = True
    keep_s, final_s = select_detections(boxes, scores, classes, params)
    assert len(keep_s) == 20 and bool((final_s <= scores[keep_s]).all())
    params.topk_per_image = -1
    keep_s, final_s = select_detections(boxes, scores, classes, params)
    params.soft_nms = False
    keep_h, _ = select_detections(boxes, scores, classes, params)
    assert len(keep_s) > len(keep_h) > 20 and bool((final_s < scores[keep_s]).any())
    empty = select_detections(boxes[:0], scores[:0], classes[:0], params)
    assert empty[0].numel() == 0 and empty[1].numel() == 0


def test_training_losses_unchanged():
    stock, ours = build_pair(make_cfg("MODEL.SOFT_NMS.ENABLED", True))
    images, features, proposals, targets = make_inputs(0)
    losses = []
    for heads in (stock.train(), ours.train()):
        torch.manual_seed(5)
        with EventStorage():
            _, loss = heads(images, features, [p[:] for p in proposals], targets)
        losses.append(loss)
    assert losses[0].keys() == losses[1].keys()
    for k in losses[0]:
        assert torch.equal(losses[0][k], losses[1][k])
