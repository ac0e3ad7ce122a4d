"""Fragment decay (``MODEL.FRAGMENT_DECAY``): the operator against a pair-by-pair reference of its definition,
its place in the shared postprocessing, and its config keys."""
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg

from d2_defects import add_defects_config
from d2_defects.inference import deploy_postprocess
from d2_defects.inference.export import ExportError, check_matches_config
from d2_defects.layers.fragments import fragment_decay
from d2_defects.modeling.postprocess import PostprocessParams, check_postprocess_keys_used, select_detections
from d2_defects.utils.errors import ConfigError


def _reference(boxes, scores, classes, overlap, factor):
    """The definition, one pair at a time in plain Python: i is a fragment when a detection j of its class is
    larger, scores higher, and covers >= overlap of i's area."""
    b = [[float(v) for v in row] for row in boxes]
    area = [max(x2 - x1, 0.0) * max(y2 - y1, 0.0) for x1, y1, x2, y2 in b]
    out = []
    for i in range(len(b)):
        frag = False
        for j in range(len(b)):
            if int(classes[j]) != int(classes[i]) or not (area[j] > area[i] > 0) or not scores[j] > scores[i]:
                continue
            w = min(b[i][2], b[j][2]) - max(b[i][0], b[j][0])
            h = min(b[i][3], b[j][3]) - max(b[i][1], b[j][1])
            frag |= max(w, 0.0) * max(h, 0.0) >= overlap * area[i]
        if not (frag and factor == 0):
            out.append((i, float(scores[i]) * (factor if frag else 1.0)))
    out.sort(key=lambda t: (-t[1], t[0]))
    return [i for i, _ in out], [s for _, s in out]


def _thin_scene(seed, n=120):
    """Long thin boxes (whole defects) and short boxes along them (fragments), three classes, score ties."""
    g = np.random.default_rng(seed)
    x1 = g.uniform(0, 100, n)
    y1 = g.uniform(0, 100, n)
    long_ = g.uniform(30, 120, n)
    horizontal = g.random(n) < 0.5
    w = np.where(horizontal, long_, g.uniform(2, 8, n))
    h = np.where(horizontal, g.uniform(2, 8, n), long_)
    boxes = np.stack([x1, y1, x1 + w, y1 + h], 1)
    parts = g.integers(0, n, n)  # a fragment: a part of another box, slightly shifted
    t0 = g.uniform(0, 0.6, n)
    t1 = t0 + g.uniform(0.1, 0.4, n)
    pb = boxes[parts]
    frag = np.stack([pb[:, 0] + t0 * (pb[:, 2] - pb[:, 0]) * horizontal[parts], pb[:, 1] + t0 * (pb[:, 3] - pb[:, 1])
                     * ~horizontal[parts], pb[:, 0] + np.where(horizontal[parts], t1, 1) * (pb[:, 2] - pb[:, 0]),
                     pb[:, 1] + np.where(horizontal[parts], 1, t1) * (pb[:, 3] - pb[:, 1])], 1)
    frag += g.normal(0, 0.7, frag.shape)
    boxes = np.concatenate([boxes, frag]).astype(np.float32)
    scores = g.uniform(0.05, 1, 2 * n).astype(np.float32)
    scores[5:12] = scores[5]
    classes = np.concatenate([g.integers(0, 3, n), g.integers(0, 3, n)])
    classes[n:] = np.where(g.random(n) < 0.8, classes[parts], classes[n:])  # most fragments: their box's class
    return boxes, scores, classes


@pytest.mark.parametrize("overlap,factor", [(0.6, 0.5), (0.9, 0.3), (0.5, 0.0), (1.0, 0.5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fragment_decay_matches_pairwise_reference_and_numpy_twin(seed, overlap, factor):
    boxes, scores, classes = _thin_scene(seed)
    keep, new = fragment_decay(torch.as_tensor(boxes), torch.as_tensor(scores), torch.as_tensor(classes),
                               overlap, factor)
    ref_keep, ref_scores = _reference(boxes, scores, classes, overlap, factor)
    assert keep.tolist() == ref_keep
    np.testing.assert_allclose(new.numpy(), ref_scores, rtol=1e-6)
    assert new.dtype == torch.float32
    decayed = len(boxes) - len(ref_keep) if factor == 0 else sum(
        abs(s - scores[i]) > 0 for i, s in zip(ref_keep, ref_scores))
    assert decayed >= (1 if overlap == 1.0 else 20)  # the scene has fragments: the operator acted
    np_keep, np_new = deploy_postprocess.fragment_decay(boxes, scores, classes, overlap, factor)
    np.testing.assert_array_equal(np_keep, keep.numpy())
    np.testing.assert_array_equal(np_new, new.numpy())


def test_fragment_decay_is_order_independent_and_keeps_classes_apart():
    boxes, scores, classes = _thin_scene(3)
    perm = np.random.default_rng(0).permutation(len(boxes))
    keep, new = fragment_decay(*(torch.as_tensor(a) for a in (boxes, scores, classes)))
    keep_p, new_p = fragment_decay(*(torch.as_tensor(a[perm]) for a in (boxes, scores, classes)))
    assert {(int(i), float(s)) for i, s in zip(keep, new)} == {(int(perm[i]), float(s)) for i, s in zip(keep_p, new_p)}
    # one whole crack and a part inside it: the part is decayed in its class only
    b = torch.tensor([[0.0, 0.0, 100.0, 6.0], [20.0, 0.0, 50.0, 6.0], [20.0, 0.0, 50.0, 6.0], [0.0, 0.0, 30, 6]])
    s = torch.tensor([0.9, 0.6, 0.6, 0.95])
    keep, new = fragment_decay(b, s, torch.tensor([1, 1, 2, 1]), 0.6, 0.5)
    assert dict(zip(keep.tolist(), new.tolist())) == pytest.approx({0: 0.9, 1: 0.3, 2: 0.6, 3: 0.95})
    # no detection, one detection
    assert fragment_decay(b[:0], s[:0], s[:0].long())[0].numel() == 0
    assert fragment_decay(b[:1], s[:1], s[:1].long())[1].tolist() == pytest.approx([0.9])


def _cfg(*opts):
    cfg = add_defects_config(get_cfg())
    cfg.merge_from_list(list(opts))
    return cfg


def test_select_detections_decays_fragments_after_the_top_k():
    boxes, scores, classes = (torch.as_tensor(a) for a in _thin_scene(4))
    params = PostprocessParams.from_config(_cfg("MODEL.FRAGMENT_DECAY.ENABLED", True, "TEST.DETECTIONS_PER_IMAGE", 40))
    assert (params.fragment_decay, params.fragment_overlap, params.fragment_factor) == (True, 0.6, 0.5)
    keep, final = select_detections(boxes, scores, classes, params)
    params.fragment_decay = False
    keep_plain, final_plain = select_detections(boxes, scores, classes, params)
    assert set(keep.tolist()) == set(keep_plain.tolist()) and len(keep) == 40  # decay after the cut
    ref_keep, ref_scores = _reference(boxes[keep_plain].numpy(), final_plain.numpy(), classes[keep_plain].numpy(),
                                      0.6, 0.5)
    assert keep.tolist() == keep_plain[ref_keep].tolist() and final.tolist() == pytest.approx(ref_scores)
    assert bool((final[1:] <= final[:-1]).all()) and not torch.equal(keep, keep_plain)


def test_fragment_decay_config_errors_name_the_key():
    for key, value in [("OVERLAP", 0.0), ("OVERLAP", 1.5), ("FACTOR", 1.0), ("FACTOR", -0.1)]:
        with pytest.raises(ConfigError, match=rf"MODEL\.FRAGMENT_DECAY\.{key} must be"):
            PostprocessParams.from_config(_cfg(f"MODEL.FRAGMENT_DECAY.{key}", value))
    # stock heads would ignore the key: refused, naming it
    with pytest.raises(ConfigError, match=r"MODEL\.FRAGMENT_DECAY\.ENABLED would be ignored"):
        check_postprocess_keys_used(_cfg("MODEL.FRAGMENT_DECAY.ENABLED", True), torch.nn.Linear(1, 1))


def test_exports_made_before_fragment_decay_still_match_a_config_without_it():
    import dataclasses
    from types import SimpleNamespace

    old = {k: v for k, v in dataclasses.asdict(PostprocessParams.from_config(_cfg())).items()
           if not k.startswith("fragment_") and k != "defer_nms"}  # a postprocess.json written before the keys
    exported = SimpleNamespace(info={"postprocess": old, "num_classes": 80})
    check_matches_config(_cfg(), exported, "export/")
    with pytest.raises(ExportError, match="postprocessing fragment_decay"):
        check_matches_config(_cfg("MODEL.FRAGMENT_DECAY.ENABLED", True), exported, "export/")


class _FragmentsDetector(torch.nn.Module):
    """A detector that finds, in every image it is given, one long box and a fragment inside it (class 0), and
    postprocesses them with its own params as the project's heads do; records the fragment setting of each call."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.params = PostprocessParams(fragment_decay=True)
        self.seen = []

    def forward(self, batched_inputs):
        from detectron2.structures import Boxes, Instances

        outs = []
        for x in batched_inputs:
            h, w = int(x["height"]), int(x["width"])
            boxes = torch.tensor([[0.05 * w, 0.4 * h, 0.95 * w, 0.5 * h], [0.2 * w, 0.4 * h, 0.4 * w, 0.5 * h]])
            keep, s = select_detections(boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 0]), self.params)
            self.seen.append(self.params.fragment_decay)
            outs.append({"instances": Instances((h, w), pred_boxes=Boxes(boxes[keep]), scores=s,
                                                pred_classes=torch.zeros(len(keep), dtype=torch.long))})
        return outs


def _merge_cfg(*opts):
    return _cfg("MODEL.FRAGMENT_DECAY.ENABLED", True, "MODEL.ROI_HEADS.NUM_CLASSES", 2, *opts)


def test_tta_and_sliced_inference_decay_fragments_once_in_the_merge():
    from d2_defects.modeling.slicing import SlicedDetector
    from d2_defects.modeling.tta import DefectTTA

    image = torch.zeros(3, 96, 128, dtype=torch.uint8)
    inp = {"image": image, "height": 96, "width": 128}
    # two views (h-flip): the views run without the decay, the merge decays each fragment once (0.8 -> 0.4)
    model = _FragmentsDetector()
    tta = DefectTTA(_merge_cfg("TEST.AUG.MIN_SIZES", "(96,)", "TEST.AUG.MAX_SIZE", 160, "TEST.AUG.FLIP", True),
                    model).eval()
    scores = sorted(tta([inp])[0]["instances"].scores.tolist())
    assert model.seen == [False, False] and model.params.fragment_decay  # switched off for the views only
    assert scores == pytest.approx([0.4, 0.4, 0.9])  # the whole box (both views' copies merged) and 2 fragments
    # one view: the model's own detections, decayed by the model
    model = _FragmentsDetector()
    tta = DefectTTA(_merge_cfg("TEST.AUG.MIN_SIZES", "(96,)", "TEST.AUG.MAX_SIZE", 160, "TEST.AUG.FLIP", False),
                    model).eval()
    assert sorted(tta([inp])[0]["instances"].scores.tolist()) == pytest.approx([0.4, 0.9]) and model.seen == [True]
    # tiles: the same, over 4 tiles; nothing is decayed twice (0.2), the fragments of tiles are decayed once
    model = _FragmentsDetector()
    sliced = SlicedDetector(_merge_cfg("TEST.SLICE.ENABLED", True, "TEST.SLICE.SIZE", "(64, 64)",
                                       "TEST.SLICE.OVERLAP", 0.2, "TEST.SLICE.INCLUDE_FULL", False), model).eval()
    scores = sliced([inp])[0]["instances"].scores.tolist()
    assert len(model.seen) >= 4 and not any(model.seen)
    assert 0.4 in [round(s, 6) for s in scores] and all(round(s, 6) in (0.4, 0.8, 0.9) for s in scores)


def test_wbf_merge_decays_fragments_and_keeps_every_box_for_top_k_all():
    from d2_defects.modeling.merge import merge_detections

    boxes = [torch.tensor([[5.0, 40, 95, 50], [20, 40, 40, 50], [60, 10, 70, 20]])]
    scores, classes = [torch.tensor([0.9, 0.8, 0.7])], [torch.tensor([0, 0, 1])]
    params = PostprocessParams(topk_per_image=-1, fragment_decay=True)
    b, s, c = merge_detections(boxes, scores, classes, (100, 100), "wbf", params)
    assert len(b) == 3 and s.tolist() == pytest.approx([0.9, 0.7, 0.4])  # no box lost to the -1 slice
    params.fragment_decay = False
    assert merge_detections(boxes, scores, classes, (100, 100), "wbf", params)[1].tolist() == pytest.approx(
        [0.9, 0.8, 0.7])


def test_exported_detector_replaces_its_postprocess_settings_within_the_block():
    from types import SimpleNamespace

    from d2_defects.inference.export import ExportedDetector
    from d2_defects.modeling.postprocess import replaced_postprocess

    settings = {"fragment_decay": True, "nms_thresh": 0.5}
    det = ExportedDetector(SimpleNamespace(info={"postprocess": settings, "num_classes": 2}))
    with replaced_postprocess(det, fragment_decay=False) as original:
        assert det.exported.info["postprocess"] == {"fragment_decay": False, "nms_thresh": 0.5}
        assert original == [settings]
    assert det.exported.info["postprocess"] is settings
    stock = ExportedDetector(SimpleNamespace(info={"postprocess": None}))  # its NMS is inside the graph
    with replaced_postprocess(stock, fragment_decay=False) as original:
        assert original == [] and stock.exported.info["postprocess"] is None
