"""Every config under configs/ parses, and builds a model on CPU (catches config rot)."""
import glob
import os

import pytest
import torch
from detectron2.modeling import build_model

import d2_defects  # noqa: F401
from d2_defects.engine.launch import load_config

from conftest import ROOT

# Base-*.yaml included: they build too (a user may start from them directly).
# configs/ablation/ holds ablation plans (tests/test_ablation.py builds their variants)
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
                 if os.sep + "ablation" + os.sep not in p)


def test_configs_exist():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "configs")))
def test_config_builds(path):
    cfg = load_config(path, ["MODEL.DEVICE", "cpu"])
    cfg.freeze()
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.zeros(3, 64, 96), "height": 64, "width": 96}])
    assert len(out) == 1 and "instances" in out[0]


def test_device_defaults_to_what_exists():
    cfg = load_config(None)
    assert cfg.MODEL.DEVICE == ("cuda" if torch.cuda.is_available() else "cpu")
