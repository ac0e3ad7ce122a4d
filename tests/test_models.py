"""Meta-architectures and backbones: DefectFCOS, DefectRCNN, ResNet DCN, timm backbones, freezing schemes.

Every model trains a few iterations on the tiny synthetic dataset (finite losses, weights move) and runs
inference on an all-zero image and on a real image without defects.
"""
import copy
import math

import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage

import d2_defects  # noqa: F401
from d2_defects.engine.launch import load_config

from conftest import ROOT, SMALL_CONFIG, TINY_OPTS

FCOS_CONFIG = f"{ROOT}/configs/synthetic/fcos_r18_cpu.yaml"
TRAIN = ["DATASETS.TRAIN", "('tiny_defects_train',)", "DATASETS.TEST", "()"]
TIMM_OPTS = ["MODEL.BACKBONE.NAME", "build_timm_fpn_backbone", "MODEL.TIMM.NAME", "convnext_atto",
             "MODEL.TIMM.OUT_INDICES", "[0, 1, 2, 3]"]


def tiny_cfg(config=SMALL_CONFIG, opts=()):
    cfg = load_config(config, [*TINY_OPTS, *TRAIN, "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128",
                               *opts])
    cfg.freeze()
    return cfg


def train_steps(cfg, model, steps=3):
    """A few SGD steps on the tiny dataset; returns the list of loss dicts (floats)."""
    torch.manual_seed(0)
    optimizer = build_optimizer(cfg, model)
    data = iter(build_detection_train_loader(cfg))
    model.train()
    history = []
    with EventStorage() as storage:
        for it in range(steps):
            storage.iter = it
            losses = model(next(data))
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            history.append({k: v.item() for k, v in losses.items()})
    return history, optimizer


@pytest.fixture(scope="module")
def normal_image(synthetic_root):
    """Model input of a real synthetic image without any defect (val or train split)."""
    cfg = tiny_cfg()
    for name in ("tiny_defects_val", "tiny_defects_train"):
        for d in DatasetCatalog.get(name):
            if not d["annotations"]:
                return DatasetMapper(cfg, is_train=False)(copy.deepcopy(d))
    raise AssertionError("the tiny synthetic dataset has no normal image")


def check_trains_and_infers(cfg, normal_image, steps=2, expected_losses=None):
    torch.manual_seed(0)
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history, _ = train_steps(cfg, model, steps)
    for losses in history:
        assert losses and all(math.isfinite(v) for v in losses.values()), losses
    if expected_losses:
        assert set(history[0]) == set(expected_losses)
    moved = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert len(moved) > len(before) // 2
    model.eval()
    zeros = {"image": torch.zeros(3, 96, 128), "height": 96, "width": 128}
    with torch.no_grad():
        outputs = model([zeros, normal_image])
    for out, inp in zip(outputs, [zeros, normal_image]):
        inst = out["instances"]
        assert inst.image_size == (inp["height"], inp["width"])
        assert torch.isfinite(inst.pred_boxes.tensor).all() and torch.isfinite(inst.scores).all()
        assert len(inst) <= cfg.TEST.DETECTIONS_PER_IMAGE
    return model, outputs


# ---------------------------------------------------------------------------------------------- FCOS
@pytest.mark.parametrize(
    "opts,loss_names",
    [
        ([], {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}),
        (["MODEL.FCOS.QUALITY_BRANCH", "iou", "MODEL.FCOS.BOX_LOSS_TYPE", "diou"],
         {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_iou"}),
    ],
    ids=["centerness-giou", "iou-diou"],
)
def test_fcos_trains_and_infers(synthetic_root, normal_image, opts, loss_names):
    check_trains_and_infers(tiny_cfg(FCOS_CONFIG, opts), normal_image, expected_losses=loss_names)


def test_fcos_default_matches_upstream_fcos_losses_and_inference():
    """With the defaults DefectFCOS computes what Detectron2's FCOS computes (same weights, same inputs)."""
    from detectron2.modeling.meta_arch.fcos import FCOS
    from detectron2.structures import Boxes, Instances

    cfg = load_config(FCOS_CONFIG, ["MODEL.DEVICE", "cpu", "TEST.DETECTIONS_PER_IMAGE", "50"])
    torch.manual_seed(1)
    ours = build_model(cfg)
    c = cfg.MODEL.FCOS
    upstream = FCOS(backbone=ours.backbone, head=ours.head, head_in_features=c.IN_FEATURES, num_classes=6,
                    center_sampling_radius=c.CENTER_SAMPLING_RADIUS, test_score_thresh=c.SCORE_THRESH_TEST,
                    test_nms_thresh=c.NMS_THRESH_TEST, test_topk_candidates=c.TOPK_CANDIDATES_TEST,
                    max_detections_per_image=50, pixel_mean=cfg.MODEL.PIXEL_MEAN, pixel_std=cfg.MODEL.PIXEL_STD)
    gen = torch.Generator().manual_seed(0)
    inst = Instances((96, 128), gt_boxes=Boxes(torch.tensor([[10.0, 10, 30, 40], [50, 20, 60, 25]])),
                     gt_classes=torch.tensor([0, 3]))
    batch = [{"image": torch.rand(3, 96, 128, generator=gen) * 255, "instances": inst}]
    with EventStorage():
        a, b = ours(batch), upstream(batch)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k]), k
    ours.eval(), upstream.eval()
    with torch.no_grad():
        ra, rb = ours(batch)[0]["instances"], upstream(batch)[0]["instances"]
    assert len(ra) > 0
    assert torch.allclose(ra.pred_boxes.tensor, rb.pred_boxes.tensor) and torch.allclose(ra.scores, rb.scores)
    assert torch.equal(ra.pred_classes, rb.pred_classes)


def test_fcos_bad_keys_name_the_key():
    for key, value in [("MODEL.FCOS.BOX_LOSS_TYPE", "l2"), ("MODEL.FCOS.QUALITY_BRANCH", "none"),
                       ("MODEL.FCOS.IN_FEATURES", "['p9']")]:
        cfg = load_config(FCOS_CONFIG, ["MODEL.DEVICE", "cpu", key, value])
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            build_model(cfg)


def _fcos_cfg(*opts):
    # FCOS with 4 classes while MODEL.ROI_HEADS.NUM_CLASSES stays 6 (from the base config)
    return load_config(FCOS_CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.FCOS.NUM_CLASSES", "4", *opts])


def test_fcos_per_class_thresholds_have_one_value_per_fcos_class():
    from d2_defects.modeling.tta import DefectTTA

    cfg = _fcos_cfg()
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 6
    model = build_model(_fcos_cfg("MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS", "[0.1, 0.2, 0.3, 0.4]"))
    assert model.postprocess_params.score_thresh_per_class == [0.1, 0.2, 0.3, 0.4]
    assert model.test_score_thresh == pytest.approx(0.1)
    for wrong in ("[0.1, 0.2, 0.3]", "[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]"):
        with pytest.raises(ValueError, match=r"MODEL\.ROI_HEADS\.SCORE_THRESH_PER_CLASS.*K=4"):
            build_model(_fcos_cfg("MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS", wrong))
    # test-time augmentation checks the list against the wrapped model's K too
    tta_opts = ["TEST.AUG.MIN_SIZES", "(64,)", "TEST.AUG.FLIP", "True"]
    tta = DefectTTA(_fcos_cfg(*tta_opts, "MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS", "[0.1, 0.2, 0.3, 0.4]"), model)
    assert tta.params.score_thresh_per_class == [0.1, 0.2, 0.3, 0.4]
    with pytest.raises(ValueError, match=r"MODEL\.ROI_HEADS\.SCORE_THRESH_PER_CLASS.*K=4"):
        DefectTTA(_fcos_cfg(*tta_opts, "MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS", str([0.1] * 6)), model)


def test_fcos_soft_nms_and_per_class_thresholds_postprocess_the_decoded_candidates():
    """
    DefectFCOS with MODEL.SOFT_NMS.ENABLED and per-class thresholds returns exactly the project's
    ``select_detections`` applied to the candidates that Detectron2's FCOS decodes (its NMS disabled).
    """
    import dataclasses

    from detectron2.modeling.meta_arch.fcos import FCOS

    from d2_defects.modeling.postprocess import select_detections

    base = ["MODEL.SOFT_NMS.ENABLED", "True", "TEST.DETECTIONS_PER_IMAGE", "100000", "MODEL.FCOS.NUM_CONVS", "1"]
    gen = torch.Generator().manual_seed(0)
    batch = [{"image": torch.rand(3, 64, 96, generator=gen) * 255}]

    def run(model, nms_thresh=None):
        """Raw detections of ``model`` on ``batch`` (no rescaling), or of upstream FCOS on the same weights."""
        if nms_thresh is not None:
            model = FCOS(backbone=model.backbone, head=model.head, head_in_features=model.head_in_features,
                         num_classes=4, test_score_thresh=model.test_score_thresh, test_nms_thresh=nms_thresh,
                         test_topk_candidates=model.test_topk_candidates, max_detections_per_image=100000,
                         pixel_mean=cfg.MODEL.PIXEL_MEAN, pixel_std=cfg.MODEL.PIXEL_STD).eval()
        with torch.no_grad():
            images = model.preprocess_image(batch)
            features = model.backbone(images.tensor)
            features = [features[f] for f in model.head_in_features]
            return model.forward_inference(images, features, model.head(features))[0]

    cfg = _fcos_cfg(*base)
    torch.manual_seed(1)
    first = build_model(cfg).eval()
    with torch.no_grad():  # a fresh head predicts near-empty boxes; boxes 4 strides wide overlap their neighbours
        first.head.bbox_pred.bias.fill_(2.0)
    # one threshold per class between the candidates' scores, so that each removes some of them
    everything = run(first, nms_thresh=1.0)
    thresholds = [float(everything.scores[everything.pred_classes == k].median()) for k in range(4)]
    assert len(set(thresholds)) == 4
    cfg = _fcos_cfg(*base, "MODEL.ROI_HEADS.SCORE_THRESH_PER_CLASS", str(thresholds))
    model = build_model(cfg).eval()
    model.load_state_dict(first.state_dict())
    params = model.postprocess_params
    assert params.soft_nms and params.score_thresh_per_class == thresholds

    cand = run(model, nms_thresh=1.0)  # IoU > 1 never happens: upstream's NMS keeps every candidate
    keep, expected_scores = select_detections(cand.pred_boxes.tensor, cand.scores, cand.pred_classes, params)
    ours = run(model)
    assert len(ours) == len(keep) > 20

    def canonical(boxes, scores, classes):
        order = sorted(range(len(scores)), key=lambda i: (-round(float(scores[i]), 5), int(classes[i]),
                                                         *[round(float(v), 2) for v in boxes[i]]))
        return boxes[order], scores[order], classes[order]

    ob, os_, oc = canonical(ours.pred_boxes.tensor, ours.scores, ours.pred_classes)
    eb, es, ec = canonical(cand.pred_boxes.tensor[keep], expected_scores, cand.pred_classes[keep])
    assert torch.equal(oc, ec)
    torch.testing.assert_close(ob, eb, atol=1e-4, rtol=0)
    torch.testing.assert_close(os_, es, atol=1e-6, rtol=0)

    # per-class thresholds remove exactly the candidates at or below their class threshold
    thresh = torch.tensor(thresholds)[cand.pred_classes]
    above = cand.scores > thresh
    assert 0 < int(above.sum()) < len(cand)
    assert bool(above[keep].all())
    # soft-NMS only decays: final scores <= the candidates' scores, some strictly lower
    original = cand.scores[keep]
    assert bool((expected_scores <= original + 1e-7).all()) and bool((expected_scores < original - 1e-4).any())
    # hard NMS (same thresholds) keeps a subset of the boxes soft-NMS keeps, with unchanged scores
    hard_params = dataclasses.replace(params, soft_nms=False)
    hard_keep, hard_scores = select_detections(cand.pred_boxes.tensor, cand.scores, cand.pred_classes, hard_params)
    assert len(hard_keep) < len(keep)
    assert set(hard_keep.tolist()) <= set(keep.tolist())
    torch.testing.assert_close(hard_scores, cand.scores[hard_keep])


# ---------------------------------------------------------------------------------------------- DefectRCNN
def test_defect_rcnn_trains_scores_and_skips(synthetic_root, normal_image):
    cfg = tiny_cfg(opts=["MODEL.META_ARCHITECTURE", "DefectRCNN", "MODEL.DEFECT_RCNN.IN_FEATURES", "['p4', 'p6']"])
    model, outputs = check_trains_and_infers(cfg, normal_image)
    for out in outputs:
        assert isinstance(out["defect_score"], float) and 0.0 <= out["defect_score"] <= 1.0

    calls = []
    model.roi_heads.register_forward_hook(lambda m, i, o: calls.append(len(i[1]["p2"])))
    defect = {"image": torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0)) * 255}
    zeros = {"image": torch.zeros(3, 96, 128)}
    with torch.no_grad():
        full = model([defect, zeros])
        scores = [o["defect_score"] for o in full]
        assert scores[0] != scores[1]
        # threshold between the two scores: only the higher-scored image reaches the ROI heads
        model.skip_normal_threshold = sum(scores) / 2
        calls.clear()
        skipped = model([defect, zeros])
        hi = 0 if scores[0] > scores[1] else 1
        assert calls == [1]
        assert len(skipped[1 - hi]["instances"]) == 0
        assert skipped[1 - hi]["defect_score"] == pytest.approx(scores[1 - hi])
        a, b = full[hi]["instances"], skipped[hi]["instances"]
        assert len(a) == len(b) and torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-4)
        # above every score: the ROI heads are never run
        model.skip_normal_threshold = 1.0
        calls.clear()
        assert all(len(o["instances"]) == 0 for o in model([defect, zeros])) and calls == []


def test_defect_rcnn_image_loss_is_bce_with_normal_negatives(synthetic_root):
    import torch.nn.functional as F
    from detectron2.structures import Boxes, Instances

    cfg = load_config(SMALL_CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.META_ARCHITECTURE", "DefectRCNN",
                                     "MODEL.DEFECT_RCNN.LOSS_WEIGHT", "0.5"])
    torch.manual_seed(0)
    model = build_model(cfg)
    img = [torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(i)) * 255 for i in range(2)]
    defect = Instances((64, 96), gt_boxes=Boxes(torch.tensor([[5.0, 5, 20, 20]])), gt_classes=torch.tensor([2]))
    normal = Instances((64, 96), gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0, dtype=torch.long))
    with EventStorage():
        losses = model([{"image": img[0], "instances": defect}, {"image": img[1], "instances": normal}])
        with torch.no_grad():  # same batch in train mode: same BatchNorm statistics as in the forward
            feats = model.backbone(model.preprocess_image([{"image": i} for i in img]).tensor)
            logits = model.image_logits(feats)
    expected = 0.5 * F.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 0.0]))
    assert losses["loss_image"].item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- DCN
def test_fresh_dcn_backbone_equals_plain_backbone():
    """Zero offsets (and a mask of exactly 1) make a fresh DCN ResNet compute the plain ResNet."""
    x = torch.rand(2, 3, 64, 96) * 255
    for depth, modulated, groups in [(18, True, 1), (50, False, 2)]:
        opts = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", str(depth), "MODEL.RESNETS.DEFORM_NUM_GROUPS", str(groups),
                "MODEL.RESNETS.DEFORM_MODULATED", str(modulated)]
        if depth == 50:
            opts += ["MODEL.RESNETS.RES2_OUT_CHANNELS", "256", "MODEL.RESNETS.NUM_GROUPS", "2",
                     "MODEL.RESNETS.WIDTH_PER_GROUP", "16"]
        plain_cfg = load_config(SMALL_CONFIG, opts)
        dcn_cfg = load_config(SMALL_CONFIG, opts + ["MODEL.BACKBONE.NAME", "build_resnet_dcn_fpn_backbone",
                                                    "MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[True, True, True, True]"])
        torch.manual_seed(0)
        plain = build_model(plain_cfg).backbone.eval()
        torch.manual_seed(0)
        dcn = build_model(dcn_cfg).backbone.eval()
        n_dcn = sum(type(m).__name__ == "ResNetDeformConv" for m in dcn.modules())
        assert n_dcn == (8 if depth == 18 else 16)
        dcn_state = dcn.state_dict()
        plain_state = plain.state_dict()
        assert set(plain_state) < set(dcn_state)  # plain checkpoints load into the DCN backbone
        for k, v in plain_state.items():
            assert torch.equal(v, dcn_state[k]), k
        with torch.no_grad():
            a, b = plain(x), dcn(x)
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-4 * a[k].abs().max().item()), (depth, k)


def test_dcn_gradients_match_finite_differences():
    """Analytic gradients (input, weight, bias, offset/mask conv weight and bias) against finite differences."""
    from detectron2.layers import Conv2d

    from d2_defects.modeling.backbone import ResNetDeformConv

    torch.manual_seed(0)
    for modulated, stride, dilation, groups in [(False, 1, 1, 1), (True, 2, 2, 2)]:
        conv = Conv2d(2, 2, kernel_size=3, stride=stride, padding=dilation, dilation=dilation, bias=True)
        dcn = ResNetDeformConv(conv, modulated=modulated, offset_groups=groups).double()
        with torch.no_grad():  # non-zero, non-integer offsets so that the bilinear sampling is exercised
            dcn.conv_offset.weight.normal_(0, 0.3)
            dcn.conv_offset.bias.uniform_(-0.8, 0.8)
        x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
        # the offset/mask predictor's weight and bias get their gradient through the bilinear sampling
        params = [dcn.weight, dcn.bias, dcn.conv_offset.weight, dcn.conv_offset.bias]
        assert all(p.dtype == torch.float64 and p.requires_grad for p in params)
        assert torch.autograd.gradcheck(lambda x, *p: dcn(x), (x, *params), eps=1e-6, atol=1e-5)


def test_dcn_bad_keys_name_the_key():
    for key, value in [("MODEL.RESNETS.DEFORM_NUM_GROUPS", "3"), ("MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[True]")]:
        cfg = load_config(SMALL_CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.NAME", "build_resnet_dcn_fpn_backbone",
                                         "MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, True, True, True]", key, value])
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            build_model(cfg)


def test_timm_backbone_trains_and_infers(synthetic_root, normal_image):
    check_trains_and_infers(tiny_cfg(opts=TIMM_OPTS), normal_image)


def test_cascade_on_dcn_backbone_trains_and_infers(synthetic_root, normal_image):
    """build_resnet_dcn_fpn_backbone (P2-P6) under the small Cascade R-CNN; the offset convs are trained too."""
    opts = ["MODEL.BACKBONE.NAME", "build_resnet_dcn_fpn_backbone",
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, True, True, True]", "MODEL.RESNETS.DEFORM_MODULATED", "True"]
    model, _ = check_trains_and_infers(tiny_cfg(opts=opts), normal_image)
    offsets = {n: p for n, p in model.named_parameters() if ".conv_offset." in n}
    assert len(offsets) == 2 * 6  # weight and bias of the 6 BasicBlocks of res3-res5 (R18)
    assert any(p.abs().sum() > 0 for n, p in offsets.items() if n.endswith("weight"))  # moved off zero


def test_fcos_on_timm_backbone_trains_and_infers(synthetic_root, normal_image):
    """build_retinanet_timm_fpn_backbone (P3-P7 from timm features) under DefectFCOS."""
    opts = [TIMM_OPTS[0], "build_retinanet_timm_fpn_backbone", *TIMM_OPTS[2:],
            "MODEL.FPN.IN_FEATURES", "['res3', 'res4', 'res5']", "MODEL.FCOS.IN_FEATURES", "['p3', 'p4', 'p5', 'p6', 'p7']"]
    model, _ = check_trains_and_infers(tiny_cfg(FCOS_CONFIG, opts), normal_image)
    assert type(model).__name__ == "DefectFCOS" and type(model.backbone.bottom_up).__name__ == "TimmBackbone"
    assert sorted(model.backbone.output_shape()) == ["p3", "p4", "p5", "p6", "p7"]


def test_fcos_on_dcn_backbone_trains_and_infers(synthetic_root, normal_image):
    """DCNv2 in res4-res5 under the P3-P7 FPN (build_retinanet_resnet_dcn_fpn_backbone), as FCOS uses it."""
    opts = ["MODEL.BACKBONE.NAME", "build_retinanet_resnet_dcn_fpn_backbone", "MODEL.RESNETS.OUT_FEATURES",
            "['res3', 'res4', 'res5']", "MODEL.FPN.IN_FEATURES", "['res3', 'res4', 'res5']",
            "MODEL.FCOS.IN_FEATURES", "['p3', 'p4', 'p5', 'p6', 'p7']",
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, False, True, True]", "MODEL.RESNETS.DEFORM_MODULATED", "True"]
    check_trains_and_infers(tiny_cfg(FCOS_CONFIG, opts), normal_image)


# ---------------------------------------------------------------------------------------------- timm
def test_timm_pretrained_weights_from_local_file_only(tmp_path):
    import timm

    torch.manual_seed(3)
    reference = timm.create_model("resnet10t", pretrained=False)
    path = tmp_path / "resnet10t.pth"
    torch.save(reference.state_dict(), path)
    base = ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.NAME", "build_timm_fpn_backbone", "MODEL.TIMM.NAME", "resnet10t"]
    model = build_model(load_config(SMALL_CONFIG, base + ["MODEL.TIMM.PRETRAINED_WEIGHTS", str(path)]))
    bottom_up = model.backbone.bottom_up
    assert sorted(bottom_up.output_shape()) == ["res2", "res3", "res4", "res5"]
    assert [s.stride for s in bottom_up.output_shape().values()] == [4, 8, 16, 32]
    loaded = bottom_up.model.state_dict()
    ref = reference.state_dict()
    assert len(loaded) > 20
    for k, v in loaded.items():
        assert torch.equal(v, ref[k]), k

    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=f"MODEL.TIMM.PRETRAINED_WEIGHTS.*{missing}"):
        build_model(load_config(SMALL_CONFIG, base + ["MODEL.TIMM.PRETRAINED_WEIGHTS", str(missing)]))
    with pytest.raises(ValueError, match=r"MODEL\.TIMM\.NAME"):
        build_model(load_config(SMALL_CONFIG, base[:-1] + ["no_such_model"]))
    with pytest.raises(ValueError, match=r"MODEL\.FPN\.IN_FEATURES"):
        build_model(load_config(SMALL_CONFIG, base + ["MODEL.TIMM.OUT_INDICES", "[2, 3, 4]"]))
