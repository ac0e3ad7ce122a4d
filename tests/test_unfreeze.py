"""MODEL.FREEZE.UNTIL_ITER: frozen for N iterations, then trained, with the optimizer holding every parameter."""
import copy

import pytest
import torch
from detectron2.engine import HookBase, TrainerBase
from torch import nn

from conftest import SMALL_CONFIG, TINY_OPTS, run_train_net
from d2_defects.engine.unfreeze import UnfreezeHook

DS = ["DATASETS.TRAIN", "('synthetic_defects_train',)", "DATASETS.TEST", "()"]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


FROZEN = ["0.weight", "0.bias", "1.weight", "1.bias"]


class _Loop(TrainerBase):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)

    def run_step(self):
        g = torch.Generator().manual_seed(self.iter)
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 2, (4,), generator=g)
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.opt.zero_grad()
        loss.backward()
        self.after_backward()
        self.opt.step()


class _Record(HookBase):
    def __init__(self):
        self.states = {}

    def after_step(self):
        t = self.trainer
        self.states[t.iter] = copy.deepcopy({"model": t.model.state_dict(), "opt": t.opt.state_dict(),
                                             "trainer": t.state_dict()})


def _loop():
    model = _net()
    model.train()
    loop = _Loop(model)
    rec = _Record()
    loop.register_hooks([UnfreezeHook(model, FROZEN, until_iter=3), rec])
    return loop, rec


def test_frozen_until_the_switch_then_trained_with_optimizer_state():
    loop, rec = _loop()
    init = copy.deepcopy(loop.model.state_dict())
    loop.train(0, 6)
    for it in (0, 1, 2):  # frozen: weights and BN statistics unchanged, no momentum buffer
        sd = rec.states[it]["model"]
        for k in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
            assert torch.equal(sd[k], init[k]), (it, k)
        assert not torch.equal(sd["4.weight"], init["4.weight"])
        assert 0 not in rec.states[it]["opt"]["state"] and 4 in rec.states[it]["opt"]["state"]
    sd = rec.states[3]["model"]
    assert not torch.equal(sd["0.weight"], init["0.weight"]) and not torch.equal(sd["1.running_mean"],
                                                                               init["1.running_mean"])
    assert 0 in rec.states[3]["opt"]["state"]  # the optimizer took the parameter on at the switch


@pytest.mark.parametrize("resume_after", [1, 4])
def test_resume_before_or_after_the_switch_is_exact(resume_after):
    full, rec_full = _loop()
    full.train(0, 6)
    saved = rec_full.states[resume_after]
    resumed, rec = _loop()
    resumed.model.load_state_dict(saved["model"])
    resumed.opt.load_state_dict(saved["opt"])
    resumed.load_state_dict(saved["trainer"])
    resumed.train(resume_after + 1, 6)
    for k, v in rec_full.states[5]["model"].items():
        assert torch.equal(v, rec.states[5]["model"][k]), k


def test_train_net_freezes_backbone_for_n_iterations(synthetic_root, tmp_path):
    out = tmp_path / "unfreeze"
    run_train_net(["--config-file", SMALL_CONFIG, *TINY_OPTS, *DS, "SOLVER.MAX_ITER", "4",
                   "SOLVER.CHECKPOINT_PERIOD", "1", "MODEL.FREEZE.SCHEME", "backbone", "MODEL.FREEZE.UNTIL_ITER",
                   "2", "OUTPUT_DIR", str(out)], synthetic_root)
    ck = [torch.load(out / f"model_{i:07d}.pth", weights_only=True) for i in range(4)]
    bb = [k for k in ck[0]["model"] if k.startswith("backbone.bottom_up.") and ck[0]["model"][k].is_floating_point()]
    heads = [k for k in ck[0]["model"] if k.startswith("roi_heads.")]
    assert bb and all(torch.equal(ck[0]["model"][k], ck[1]["model"][k]) for k in bb)  # frozen, BN stats too
    assert any(not torch.equal(ck[0]["model"][k], ck[1]["model"][k]) for k in heads)
    assert any(not torch.equal(ck[1]["model"][k], ck[3]["model"][k]) for k in bb if "conv" in k)
    # every parameter was in the optimizer from the start; the backbone's got momentum only after the switch
    opt = [c["trainer"]["_trainer"]["optimizer"] for c in ck]
    n_params = sum(len(g["params"]) for g in opt[0]["param_groups"])
    trainable = [k for k in ck[0]["model"] if "running" not in k and "num_batches" not in k
                 and not k.startswith("pixel_")]
    assert n_params == len(trainable)
    assert len(opt[0]["state"]) == len(opt[1]["state"]) == len(trainable) - len([k for k in bb if "running" not in k])
    assert len(opt[3]["state"]) == n_params


def test_until_iter_without_a_scheme_is_a_config_error(synthetic_root, tmp_path):
    proc = run_train_net(["--config-file", SMALL_CONFIG, *TINY_OPTS, *DS, "MODEL.FREEZE.UNTIL_ITER", "5",
                          "OUTPUT_DIR", str(tmp_path)], synthetic_root, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "MODEL.FREEZE.UNTIL_ITER is 5 but nothing is frozen" in proc.stderr
