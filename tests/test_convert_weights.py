"""Weights conversion (d2_defects.modeling.convert, tools/convert_weights.py), proven by equality: the source
network built in its own library with random weights gives the same features / logits after conversion."""
import os
import subprocess
import sys

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone import build_resnet_backbone

import d2_defects  # noqa: F401
from conftest import ROOT, SMALL_CONFIG
from d2_defects.engine.launch import load_config
from d2_defects.modeling.convert import (
    TORCHVISION_PIXEL_MEAN,
    parse_class_map,
    read_state_dict,
    remap_classes,
    set_cascade_stages,
    timm_to_d2,
    torchvision_resnet_to_d2,
)
from d2_defects.utils.errors import CheckpointError

TOOL = os.path.join(ROOT, "tools", "convert_weights.py")


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def _cfg_from_lines(lines, norm="FrozenBN"):
    cfg = load_config(None, ["MODEL.DEVICE", "cpu"])
    for line in lines:
        key, value = line.split(" ", 1)
        cfg.merge_from_list([key, value.strip('"')])
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return cfg


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_torchvision_resnet_gives_the_same_features(arch):
    import torchvision

    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)(weights=None).eval()
    _randomise_bn(tv)
    sd, lines = torchvision_resnet_to_d2(tv.state_dict(), prefix="")
    assert "INPUT.FORMAT \"RGB\"" in lines and "MODEL.RESNETS.STRIDE_IN_1X1 False" in lines
    assert f"MODEL.PIXEL_MEAN [{', '.join(f'{x:g}' for x in TORCHVISION_PIXEL_MEAN)}]" in lines
    cfg = _cfg_from_lines(lines)
    d2 = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    missing, unexpected = d2.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "num_batches_tracked" not in m]
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ours = d2(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for i, name in enumerate(["res2", "res3", "res4", "res5"]):
            y = getattr(tv, f"layer{i + 1}")(y)
            assert (ours[name] - y).abs().max().item() < 1e-4, name


def test_torchvision_prefix_loads_into_the_fpn_detector(tmp_path):
    import torchvision

    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(tv.state_dict(), path)
    out = tmp_path / "r18_d2.pth"
    proc = subprocess.run([sys.executable, TOOL, "--from", "torchvision", str(path), str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "MODEL.RESNETS.DEPTH 18" in proc.stdout and "MODEL.WEIGHTS" in proc.stdout
    cfg = load_config(SMALL_CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "FrozenBN"])
    model = build_model(cfg)
    sd = torch.load(out, weights_only=True)["model"]
    own = model.state_dict()
    assert all(k in own and own[k].shape == v.shape for k, v in sd.items())
    bottom_up = [k for k in own if k.startswith("backbone.bottom_up.") and "num_batches" not in k]
    assert set(bottom_up) <= set(sd)  # the whole ResNet comes from the file


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_checkpoint_gives_the_same_features(tmp_path, suffix):
    import timm

    torch.manual_seed(0)
    src = timm.create_model("resnet18", pretrained=False).eval()
    _randomise_bn(src, seed=1)
    path = tmp_path / f"r18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(src.state_dict(), str(path))
    else:
        torch.save(src.state_dict(), path)
    cfg = load_config(SMALL_CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.NAME", "build_timm_fpn_backbone",
                                     "MODEL.TIMM.NAME", "resnet18"])
    model = build_model(cfg).eval()
    bottom_up = model.backbone.bottom_up
    sd, _ = read_state_dict(str(path))
    out, dropped, missing = timm_to_d2(sd, bottom_up.model.state_dict())
    assert {"fc.weight", "fc.bias"} <= set(dropped) and not missing
    result = model.load_state_dict(out, strict=False)
    assert not result.unexpected_keys
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        feats = bottom_up(x)
        ref = src.forward_intermediates(x, intermediates_only=True)[1:]  # stem output excluded
    for f, r in zip([feats[k] for k in sorted(feats)], ref):
        assert (f - r).abs().max().item() < 1e-4
    with pytest.raises(CheckpointError, match="another architecture"):
        timm_to_d2({"x.weight": torch.zeros(1)}, bottom_up.model.state_dict())


def _predictor_logits(model, features):
    heads = model.roi_heads
    preds = heads.box_predictor if isinstance(heads.box_predictor, torch.nn.ModuleList) else [heads.box_predictor]
    return [p(features) for p in preds]


@pytest.mark.parametrize("heads", ["DefectCascadeROIHeads", "DefectStandardROIHeads"])
def test_class_surgery_keeps_the_mapped_classes_logits(heads):
    torch.manual_seed(0)
    opts = ["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NAME", heads, "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG",
            str(heads == "DefectCascadeROIHeads")]
    old = build_model(load_config(SMALL_CONFIG, opts)).eval()
    new_model = build_model(load_config(SMALL_CONFIG, opts + ["MODEL.ROI_HEADS.NUM_CLASSES", "3"])).eval()
    mapping = {2: 0, 0: 1}  # new class 2 has no old class
    sd, info = remap_classes(old.state_dict(), 3, mapping)
    assert info["old_classes"] == 6 and info["new_classes"] == 3
    new_model.load_state_dict(sd)
    x = torch.randn(5, 256)
    with torch.no_grad():
        for (so, do), (sn, dn) in zip(_predictor_logits(old, x), _predictor_logits(new_model, x)):
            # equal up to float rounding (a matmul of another width sums in another order)
            assert torch.allclose(sn[:, 0], so[:, 2], atol=1e-6) and torch.allclose(sn[:, 1], so[:, 0], atol=1e-6)
            assert torch.allclose(sn[:, 3], so[:, 6], atol=1e-6)  # background stays the last row
            if do.shape[1] == 4 * 6:  # class-specific regression rows follow their classes
                assert torch.allclose(dn[:, 0:4], do[:, 8:12], atol=1e-6)
                assert torch.allclose(dn[:, 4:8], do[:, 0:4], atol=1e-6)
            else:
                assert torch.allclose(dn, do, atol=1e-6)


def test_class_surgery_fcos():
    torch.manual_seed(0)
    fcos = os.path.join(ROOT, "configs", "synthetic", "fcos_r18_cpu.yaml")
    old = build_model(load_config(fcos, ["MODEL.DEVICE", "cpu"])).eval()
    new_model = build_model(load_config(fcos, ["MODEL.DEVICE", "cpu", "MODEL.FCOS.NUM_CLASSES", "2"])).eval()
    sd, _ = remap_classes(old.state_dict(), 2, {5: 0})
    new_model.load_state_dict(sd)
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        assert torch.allclose(new_model.head.cls_score(x)[:, 0], old.head.cls_score(x)[:, 5], atol=1e-6)


def test_class_map_by_name_and_errors():
    old, new = ["scratch", "crack", "spot"], ["spot", "crack", "dirt"]
    assert parse_class_map("crack:crack,spot:spot", old, new) == {1: 1, 2: 0}
    assert parse_class_map("0:2") == {0: 2}
    with pytest.raises(CheckpointError, match="'hole' is not one of"):
        parse_class_map("hole:spot", old, new)
    with pytest.raises(CheckpointError, match="mapped twice"):
        parse_class_map("0:1,2:1")
    with pytest.raises(CheckpointError, match="outside"):
        remap_classes({"roi_heads.box_predictor.cls_score.weight": torch.zeros(4, 2),
                       "roi_heads.box_predictor.cls_score.bias": torch.zeros(4)}, 2, {5: 0})


def test_cascade_stages_copy_or_drop():
    torch.manual_seed(0)
    three = build_model(load_config(SMALL_CONFIG, ["MODEL.DEVICE", "cpu"])).state_dict()
    four_cfg = os.path.join(ROOT, "configs", "synthetic", "cascade_4stage_r18_cpu.yaml")
    four = build_model(load_config(four_cfg, ["MODEL.DEVICE", "cpu"]))
    sd, old = set_cascade_stages(three, 4)
    assert old == 3
    four.load_state_dict(sd)  # strict: every key present with its shape
    for k, v in four.state_dict().items():
        if ".box_head.3." in k or ".box_predictor.3." in k:
            assert torch.equal(v, three[k.replace(".3.", ".2.")])
    two, _ = set_cascade_stages(three, 2)
    assert not [k for k in two if ".box_head.2." in k or ".box_predictor.2." in k]
    assert len(two) < len(three)


def test_tool_num_classes_end_to_end_and_errors(tmp_path):
    model = build_model(load_config(SMALL_CONFIG, ["MODEL.DEVICE", "cpu"]))
    ckpt = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "optimizer": {"state": {}}, "iteration": 599}, ckpt)
    out = tmp_path / "init.pth"
    proc = subprocess.run([sys.executable, TOOL, "--from", "detectron2", str(ckpt), str(out), "--num-classes", "4",
                           "--stages", "4"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"model", "__author__"}  # optimizer and iteration dropped
    assert saved["model"]["roi_heads.box_predictor.3.cls_score.weight"].shape[0] == 5
    # existing output, missing input, a file that is not a checkpoint: one ERROR line each
    for args in ([str(ckpt), str(out)], [str(tmp_path / "nope.pth"), str(tmp_path / "o.pth")]):
        proc = subprocess.run([sys.executable, TOOL, "--from", "detectron2", *args, "--num-classes", "4"],
                              cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert len([l for l in proc.stderr.splitlines() if l.startswith("ERROR:")]) == 1
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, TOOL, "--from", "torchvision", str(bad), str(tmp_path / "o2.pth")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(bad) in proc.stderr


def test_loading_logs_one_table_per_module(tmp_path):
    import logging

    from d2_defects.checkpoint import DefectCheckpointer

    four = build_model(load_config(os.path.join(ROOT, "configs", "synthetic", "cascade_4stage_r18_cpu.yaml"),
                                   ["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", "3"]))
    three = build_model(load_config(SMALL_CONFIG, ["MODEL.DEVICE", "cpu"]))
    path = tmp_path / "three.pth"
    torch.save({"model": three.state_dict()}, path)
    records = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    ckpt = DefectCheckpointer(four)
    handler = _Keep()
    ckpt.logger.addHandler(handler)
    ckpt.logger.setLevel(logging.INFO)
    try:
        ckpt.load(str(path))
    finally:
        ckpt.logger.removeHandler(handler)
    table = [r for r in records if r.startswith(f"Loaded {path}")]
    assert len(table) == 1
    rows = {l.split("  ")[0].strip(): [int(x) for x in l.split()[-3:]] for l in table[0].splitlines()[2:-1]}
    n_bb = len([k for k in four.state_dict() if k.startswith("backbone.bottom_up.") and "num_batches" not in k])
    assert rows["backbone.bottom_up"] == [n_bb, 0, 0]
    # 3 stages of box predictors fit by name but not by shape (6 vs 3 classes); the 4th stage is missing
    loaded, skipped, missing = rows["roi_heads.box_predictor"]
    assert skipped == 6 and missing == 4 and loaded == 6  # cls_score w+b of 3 stages; bbox_pred of 3; stage 4


def test_finetune_from_a_checkpoint_with_another_class_list(synthetic_root, tmp_path):
    """The synthetic fine-tuning path: a 4-class run -> converted by class name -> 6-class fine-tuning that
    freezes the backbone for its first iteration (configs/synthetic/finetune_from_4class_r18_cpu.yaml)."""
    import shutil

    from conftest import TINY_OPTS, run_train_net

    manifest = os.path.join(synthetic_root, "synthetic_4class.yaml")
    shutil.copy(os.path.join(ROOT, "datasets", "synthetic_4class.yaml"), manifest)
    four = tmp_path / "four"
    run_train_net(["--config-file", os.path.join(ROOT, "configs", "synthetic", "cascade_r18_4class_cpu.yaml"),
                   *TINY_OPTS, "SOLVER.MAX_ITER", "2", "DATASETS.MANIFEST", manifest, "OUTPUT_DIR", str(four)],
                  synthetic_root)
    converted = tmp_path / "six.pth"
    env = dict(os.environ, DETECTRON2_DATASETS=synthetic_root)
    proc = subprocess.run([sys.executable, TOOL, "--from", "detectron2", str(four / "model_final.pth"), str(converted),
                           "--old-dataset", "synthetic4_train", "--new-dataset", "synthetic_defects_train",
                           "--manifest", manifest], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "classes 4 -> 6" in proc.stdout and "0 (scratch) -> 0 (scratch)" in proc.stdout
    six = tmp_path / "six"
    run_train_net(["--config-file", os.path.join(ROOT, "configs", "synthetic", "finetune_from_4class_r18_cpu.yaml"),
                   *TINY_OPTS, "SOLVER.MAX_ITER", "2", "MODEL.FREEZE.UNTIL_ITER", "1", "MODEL.WEIGHTS", str(converted),
                   "OUTPUT_DIR", str(six)], synthetic_root)
    log = (six / "log.txt").read_text()
    table = log[log.index(f"Loaded {converted}"):].split("tensors of the file")[0]
    row = [l for l in table.splitlines() if l.startswith("roi_heads.box_predictor")][0]
    assert [int(x) for x in row.split()[-3:]][1:] == [0, 0]  # every predictor tensor loaded, none skipped
    assert "train from iteration 1 on" in log
