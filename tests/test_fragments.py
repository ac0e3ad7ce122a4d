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
