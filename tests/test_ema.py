"""EMA of the weights (d2_defects.engine.ema): against torch.optim.swa_utils.AveragedModel, the decay ramp,
resume equality, and the end-to-end path through train_net.py."""
import copy
import json
import math

import pytest
import torch
from detectron2.engine import HookBase, TrainerBase
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from conftest import SMALL_CONFIG, TINY_OPTS, run_train_net
from d2_defects.engine.ema import EMAHook, EMAState, ema_decay, validate_ema_config
from d2_defects.engine.launch import load_config
from d2_defects.utils.errors import ConfigError

DS = ["DATASETS.TRAIN", "('synthetic_defects_train',)", "DATASETS.TEST", "('synthetic_defects_val',)"]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def _batch(i):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 2, (4,), generator=g)


def _step(model, opt, i):
    x, y = _batch(i)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_ema_state_equals_averaged_model():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    decay = 0.9
    oracle = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ours = EMAState()
    for i in range(12):
        _step(model, opt, i)
        oracle.update_parameters(model)
        ours.update(model.state_dict(), decay, i)
    ref = oracle.module.state_dict()
    for k, v in ours.average.items():
        if v.is_floating_point():
            assert torch.allclose(v, ref[k], rtol=0, atol=1e-6), k
        else:  # integer buffers (BN's num_batches_tracked): the latest value
            assert torch.equal(v, model.state_dict()[k]), k
    assert ours.average["1.running_mean"].abs().sum() > 0  # BN statistics are averaged too
    assert not ours.update(model.state_dict(), decay, 11)  # an iteration is folded in once


def test_decay_ramp():
    assert ema_decay(1, 0.999, 0) == 0.999
    assert ema_decay(1, 0.999, 100) == pytest.approx(0.999 * (1 - math.exp(-0.01)))
    assert ema_decay(10000, 0.999, 100) == pytest.approx(0.999, abs=1e-9)
    assert all(ema_decay(t, 0.99, 50) < ema_decay(t + 1, 0.99, 50) for t in range(1, 200))


class _Loop(TrainerBase):
    """A training loop whose batch is a function of the iteration (resumable exactly)."""

    def __init__(self, model, opt):
        super().__init__()
        self.model, self.opt = model, opt

    def run_step(self):
        _step(self.model, self.opt, self.iter)


class _Snapshot(HookBase):
    def __init__(self, period, stop_at=None):
        self.period, self.stop_at, self.saved = period, stop_at, {}

    def after_step(self):
        if (self.trainer.iter + 1) % self.period == 0:
            t = self.trainer
            self.saved[t.iter] = copy.deepcopy({"model": t.model.state_dict(), "opt": t.opt.state_dict(),
                                                "trainer": t.state_dict()})
        if self.stop_at is not None and self.trainer.iter + 1 == self.stop_at:
            raise KeyboardInterrupt  # killed


def _loop(ema_first, snapshot):
    model = _net()
    loop = _Loop(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    ema = EMAHook(model, decay=0.8, warmup_iters=3)
    loop.register_hooks([ema, snapshot] if ema_first else [snapshot, ema])
    return loop, ema


@pytest.mark.parametrize("ema_first", [True, False])
def test_resumed_run_ends_with_the_same_ema(ema_first):
    full, ema_full = _loop(ema_first, _Snapshot(3))
    full.train(0, 9)
    # reference by hand: ramped decay, one update per iteration
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = EMAState()
    for i in range(9):
        _step(model, opt, i)
        ref.update(model.state_dict(), ema_decay(i + 1, 0.8, 3), i)
    for k, v in ref.average.items():
        assert torch.allclose(v.float(), ema_full.state.average[k].float(), atol=1e-6), k

    killed_snapshot = _Snapshot(3, stop_at=5)
    killed, _ = _loop(ema_first, killed_snapshot)
    with pytest.raises(KeyboardInterrupt):
        killed.train(0, 9)
    ckpt = killed_snapshot.saved[2]  # the last checkpoint before the kill: after iteration 2
    resumed, ema_resumed = _loop(ema_first, _Snapshot(3))
    resumed.model.load_state_dict(ckpt["model"])
    resumed.opt.load_state_dict(ckpt["opt"])
    resumed.load_state_dict(ckpt["trainer"])
    resumed.train(3, 9)
    assert ema_resumed.state.num_updates == ema_full.state.num_updates == 9
    for k, v in ema_full.state.average.items():
        assert torch.equal(v, ema_resumed.state.average[k]), k


def test_config_errors_name_the_key():
    cfg = load_config(SMALL_CONFIG, ["MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "1.5"])
    with pytest.raises(ConfigError, match="MODEL_EMA.DECAY"):
        validate_ema_config(cfg)
    cfg = load_config(SMALL_CONFIG, ["MODEL_EMA.ENABLED", "True", "MODEL_EMA.WARMUP_ITERS", "-1"])
    with pytest.raises(ConfigError, match="MODEL_EMA.WARMUP_ITERS"):
        validate_ema_config(cfg)


def test_train_net_with_ema_writes_evaluates_and_checkpoints_it(synthetic_root, tmp_path):
    out = tmp_path / "ema"
    run_train_net(["--config-file", SMALL_CONFIG, *TINY_OPTS, *DS, "SOLVER.MAX_ITER", "4",
                   "SOLVER.CHECKPOINT_PERIOD", "2", "MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "0.5",
                   "MODEL_EMA.WARMUP_ITERS", "0", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.001",
                   "OUTPUT_DIR", str(out)], synthetic_root)
    results = json.loads((out / "eval_results.json").read_text())
    assert "bbox" in results and "ema/bbox" in results and "ema/defect" in results
    assert (out / "inference_ema" / "synthetic_defects_val" / "coco_instances_results.json").exists()
    ema = torch.load(out / "model_ema.pth", weights_only=True)
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert (out / "last_checkpoint").read_text() == "model_final.pth"  # model_ema.pth is not resumed from
    hook_state = final["trainer"]["hooks"]["EMAHook"]
    assert hook_state["num_updates"] == 3  # the weights after iterations 0..2; the 4th is folded in at the end
    assert ema["num_updates"] == 4
    differs = [k for k, v in ema["model"].items() if v.is_floating_point() and not torch.equal(v, final["model"][k])]
    assert differs  # an average, not a copy of the live weights
    metrics = [json.loads(l) for l in (out / "metrics.json").read_text().splitlines()]
    assert any("ema/bbox/AP" in m for m in metrics)


def test_ema_with_swa_and_two_processes(synthetic_root, tmp_path):
    """Two CPU processes (gloo), EMA next to SWA: one writer, every rank evaluates the same average."""
    out = tmp_path / "ddp"
    run_train_net(["--config-file", SMALL_CONFIG, "--num-gpus", "2", "--dist-url", "auto", *TINY_OPTS, *DS,
                   "SOLVER.MAX_ITER", "2", "SOLVER.SWA.ENABLED", "True", "SOLVER.SWA.NUM_CYCLES", "2",
                   "SOLVER.SWA.CYCLE_ITERS", "1", "SOLVER.SWA.BN_UPDATE_ITERS", "1", "MODEL_EMA.ENABLED", "True",
                   "MODEL_EMA.WARMUP_ITERS", "0", "MODEL_EMA.DECAY", "0.5", "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
                   "0.001", "OUTPUT_DIR", str(out)], synthetic_root)
    results = json.loads((out / "eval_results.json").read_text())
    assert {"bbox", "swa/bbox", "ema/bbox"} <= set(results)
    ema = torch.load(out / "model_ema.pth", weights_only=True)
    assert ema["num_updates"] == 4  # the 2 regular and 2 SWA iterations
    assert not list(out.glob("*.tmp-*"))
