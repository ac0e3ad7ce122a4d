"""Freezing schemes: frozen weights (and BatchNorm statistics) stay bit-identical through training steps, get
no gradient and no optimizer state; FCOS through train_net.py (train, then --eval-only) with a scheme set."""
import json
import re

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import d2_defects  # noqa: F401
from d2_defects.engine.launch import load_config
from d2_defects.modeling.freeze import freeze_model, frozen_parameter_names

from conftest import ROOT, SMALL_CONFIG, TINY_OPTS, run_train_net


def _batch():
    gen = torch.Generator().manual_seed(0)
    inst = Instances((64, 96), gt_boxes=Boxes(torch.tensor([[10.0, 8, 40, 30], [60, 40, 70, 60]])),
                     gt_classes=torch.tensor([1, 4]))
    empty = Instances((64, 96), gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0, dtype=torch.long))
    return [{"image": torch.rand(3, 64, 96, generator=gen) * 255, "instances": inst},
            {"image": torch.rand(3, 64, 96, generator=gen) * 255, "instances": empty}]


def _model(scheme, patterns=()):
    cfg = load_config(SMALL_CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.META_ARCHITECTURE", "DefectRCNN",
                                     "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
                                     "SOLVER.BASE_LR", "0.01", "SOLVER.MOMENTUM", "0.9", "SOLVER.WEIGHT_DECAY", "0.001"])
    torch.manual_seed(0)
    model = build_model(cfg)
    trainable, total, summary = freeze_model(model, scheme, patterns)
    assert summary.startswith(f"Trainable parameters: {trainable:,} of {total:,}")
    return cfg, model, trainable


def _train(cfg, model, steps=2):
    optimizer = build_optimizer(cfg, model)
    model.train()
    with EventStorage():
        for _ in range(steps):
            losses = model(_batch())
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    return optimizer


PREFIXES = {  # scheme -> (frozen prefixes, trainable prefixes)
    "backbone": (("backbone.bottom_up.",), ("backbone.fpn_", "proposal_generator.", "roi_heads.", "image_head.")),
    "backbone+fpn": (("backbone.",), ("proposal_generator.", "roi_heads.", "image_head.")),
    "all_but_heads": (("backbone.", "proposal_generator."), ("roi_heads.", "image_head.")),
}


@pytest.mark.parametrize("scheme", sorted(PREFIXES))
def test_frozen_weights_stay_bit_identical(scheme):
    cfg, model, trainable = _model(scheme)
    frozen_prefixes, trainable_prefixes = PREFIXES[scheme]
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.startswith(frozen_prefixes):
            assert not p.requires_grad, name
        elif name.startswith(trainable_prefixes):
            assert p.requires_grad, name
    assert trainable == sum(p.numel() for p in params.values() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in params.values())

    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = _train(cfg, model)
    after = model.state_dict()
    frozen_keys = [k for k in before if k.startswith(frozen_prefixes)]
    assert frozen_keys
    for k in frozen_keys:  # parameters and BatchNorm statistics
        assert torch.equal(before[k], after[k]), k
    changed = [k for k in before if k.startswith(trainable_prefixes) and not torch.equal(before[k], after[k])]
    assert len(changed) > 5
    frozen_params = [p for n, p in model.named_parameters() if n.startswith(frozen_prefixes)]
    assert all(p.grad is None for p in frozen_params)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in frozen_params}
    assert not set(map(id, optimizer.state)) & {id(p) for p in frozen_params}


def test_patterns_freeze_matching_parameters():
    pattern = r"^roi_heads\.box_head\.0\."
    cfg, model, _ = _model("none", [pattern])
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(re.search(pattern, n) for n in frozen)
    assert len(frozen) == len([n for n, _ in model.named_parameters() if re.search(pattern, n)])
    before = {n: p.clone() for n, p in model.named_parameters() if n in frozen}
    _train(cfg, model, steps=1)
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n


def test_bad_freeze_settings_name_the_key():
    _, model, _ = _model("none")
    with pytest.raises(ValueError, match=r"MODEL\.FREEZE\.SCHEME"):
        frozen_parameter_names(model, "heads")
    with pytest.raises(ValueError, match=r"MODEL\.FREEZE\.PATTERNS.*invalid regex"):
        frozen_parameter_names(model, "none", ["backbone.(("])
    with pytest.raises(ValueError, match=r"MODEL\.FREEZE\.PATTERNS.*matches no parameter"):
        frozen_parameter_names(model, "none", ["^no_such_module\\."])


def test_fcos_train_net_with_freezing_then_eval_only(synthetic_root, tmp_path):
    config = f"{ROOT}/configs/synthetic/fcos_r18_cpu.yaml"
    ds = ["DATASETS.TRAIN", "('synthetic_defects_train',)", "DATASETS.TEST", "('synthetic_defects_val',)"]
    out = tmp_path / "train"
    proc = run_train_net(["--config-file", config, *TINY_OPTS, *ds, "SOLVER.MAX_ITER", "3",
                          "MODEL.FREEZE.SCHEME", "backbone", "OUTPUT_DIR", out], synthetic_root)
    log = proc.stdout + proc.stderr
    line = re.search(r"Trainable parameters: ([\d,]+) of ([\d,]+) .*MODEL\.FREEZE\.SCHEME='backbone'", log)
    assert line, log[-3000:]
    trainable, total = (int(x.replace(",", "")) for x in line.groups())
    assert 0 < trainable < total
    trained = json.loads((out / "eval_results.json").read_text())["bbox"]
    assert {"AP", "AP50", "AP-scratch"} <= set(trained)

    run_train_net(["--config-file", config, "--eval-only", *TINY_OPTS, *ds, "MODEL.WEIGHTS", out / "model_final.pth",
                   "OUTPUT_DIR", tmp_path / "eval"], synthetic_root)
    evaluated = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["bbox"]
    for k in trained:
        assert evaluated[k] == pytest.approx(trained[k], abs=1e-6, nan_ok=True), k
