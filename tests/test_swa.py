"""SWA: the average against torch.optim.swa_utils, the LR schedule value by value, kill-and-resume, DDP."""
import copy
import math
import random

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase
from detectron2.solver import build_lr_scheduler
from torch import nn
from torch.optim.swa_utils import AveragedModel

from conftest import SMALL_CONFIG, TINY_OPTS, run_train_net
from d2_defects.engine.launch import load_config
from d2_defects.engine.swa import (
    SWAState,
    averaged_weights,
    swa_max_iter,
    swa_snapshot_iters,
    validate_swa_config,
)
from d2_defects.engine.trainer import Trainer


def _tiny_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def _assert_same_floats(ours, oracle, atol=1e-6):
    """``ours``/``oracle``: name -> tensor; every floating-point tensor must agree."""
    assert set(ours) == set(oracle)
    for k, v in oracle.items():
        if v.is_floating_point():
            torch.testing.assert_close(ours[k], v, rtol=0, atol=atol, msg=k)


def test_running_average_matches_averaged_model():
    torch.manual_seed(0)
    net = _tiny_net()
    net(torch.randn(2, 3, 6, 6))  # materialize the lazy layer, set BN buffers
    oracle = AveragedModel(net, use_buffers=True)
    ours = SWAState()
    snapshots = []
    for _ in range(7):
        with torch.no_grad():
            for t in list(net.parameters()) + [net[1].running_mean, net[1].running_var]:
                t.add_(torch.randn_like(t))
        net(torch.randn(2, 3, 6, 6))
        snapshots.append(copy.deepcopy(net.state_dict()))
        ours.update(net.state_dict())
        oracle.update_parameters(net)
    assert ours.num_averaged == 7
    _assert_same_floats(ours.average, oracle.module.state_dict())
    # and the plain mean of the snapshots
    mean = {k: torch.stack([s[k] for s in snapshots]).mean(0) for k in snapshots[0] if snapshots[0][k].is_floating_point()}
    for k, v in mean.items():
        torch.testing.assert_close(ours.average[k], v, rtol=0, atol=1e-5)
    # state_dict round trip continues identically
    restored = SWAState()
    restored.load_state_dict(copy.deepcopy(ours.state_dict()))
    ours.update(snapshots[0])
    restored.update(snapshots[0])
    for k in ours.average:
        assert torch.equal(ours.average[k], restored.average[k])
    assert restored.num_averaged == 8


def test_averaged_weights_context_restores_live_weights():
    torch.manual_seed(0)
    net = _tiny_net()
    net(torch.randn(2, 3, 6, 6))
    live = copy.deepcopy(net.state_dict())
    other = {k: v + 1 if v.is_floating_point() else v for k, v in live.items()}
    net.train()
    with pytest.raises(RuntimeError, match="boom"):
        with averaged_weights(net, other) as m:
            assert m is net
            assert torch.equal(net[0].weight, other["0.weight"])
            net.eval()
            raise RuntimeError("boom")
    assert net.training
    for k, v in live.items():
        assert torch.equal(net.state_dict()[k], v), k


def _cfg(*opts):
    return load_config(SMALL_CONFIG, [*TINY_OPTS, *opts])


SWA_OPTS = ["SOLVER.MAX_ITER", "10", "SOLVER.WARMUP_ITERS", "3", "SOLVER.STEPS", "(6,)", "SOLVER.GAMMA", "0.1",
            "SOLVER.BASE_LR", "0.02", "SOLVER.SWA.ENABLED", "True", "SOLVER.SWA.NUM_CYCLES", "3",
            "SOLVER.SWA.CYCLE_ITERS", "4", "SOLVER.SWA.LR_START_FACTOR", "0.5", "SOLVER.SWA.LR_END_FACTOR", "0.01"]


def _lrs_used(scheduler, optimizer, n):
    """LR used by each of the first ``n`` iterations (detectron2 steps the scheduler after each)."""
    out = []
    for _ in range(n):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_lr_schedule_value_by_value(shape):
    cfg = _cfg(*SWA_OPTS, "SOLVER.SWA.LR_SHAPE", shape)
    assert swa_max_iter(cfg) == 10 + 3 * 4
    assert swa_snapshot_iters(cfg) == [13, 17, 21]

    def opt():
        return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)

    o = opt()
    ours = _lrs_used(Trainer.build_lr_scheduler(cfg, o), o, 22)
    o = opt()
    stock = _lrs_used(build_lr_scheduler(cfg, o), o, 10)  # detectron2's regular schedule
    assert ours[:10] == pytest.approx(stock, rel=1e-12)
    assert stock[2] < stock[3] == pytest.approx(0.02) and stock[6] == pytest.approx(0.002)  # warmup, step
    if shape == "linear":
        cycle = [0.5, 0.5 - 0.49 / 3, 0.5 - 2 * 0.49 / 3, 0.01]
    else:
        cycle = [0.5, 0.01 + 0.49 * 0.75, 0.01 + 0.49 * 0.25, 0.01]  # (1 + cos(pi t)) / 2 at t = 0, 1/3, 2/3, 1
    assert ours[10:] == pytest.approx([0.02 * f for f in cycle * 3], rel=1e-9)
    # the last iteration of every cycle (the snapshot) uses the end factor
    for it in swa_snapshot_iters(cfg):
        assert ours[it] == pytest.approx(0.02 * 0.01)


def test_lr_schedule_one_iteration_cycles_and_disabled():
    cfg = _cfg(*SWA_OPTS, "SOLVER.SWA.CYCLE_ITERS", "1")
    o = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.02)
    assert _lrs_used(Trainer.build_lr_scheduler(cfg, o), o, 13)[10:] == pytest.approx([0.0002] * 3)
    cfg = _cfg("SOLVER.MAX_ITER", "10")
    assert swa_max_iter(cfg) == 10


@pytest.mark.parametrize("key,value", [("NUM_CYCLES", "0"), ("CYCLE_ITERS", "0"), ("LR_END_FACTOR", "-0.1"),
                                       ("BN_UPDATE_ITERS", "-1"), ("LR_SHAPE", "'step'")])
def test_bad_config_names_the_key(key, value):
    cfg = _cfg(*SWA_OPTS, f"SOLVER.SWA.{key}", value)
    with pytest.raises(ValueError, match=f"SOLVER.SWA.{key}"):
        validate_swa_config(cfg)


# ---------------------------------------------------------------- real detector runs (in-process)

class _Seeder(HookBase):
    """Makes every iteration depend only on its index (augmentation, proposal sampling), so that a
    resumed run can reproduce the uninterrupted one exactly."""

    def before_train(self):
        # The train loader's iterator is created inside the first iteration and draws from torch's RNG
        # (a different iteration in a resumed run): reseed torch again right before the forward.
        def reseed(module, inputs):
            torch.manual_seed(self.trainer.iter)

        self.trainer.model.register_forward_pre_hook(reseed)

    def before_step(self):
        torch.manual_seed(self.trainer.iter)
        np.random.seed(self.trainer.iter)
        random.seed(self.trainer.iter)


class _Recorder(HookBase):
    """Records the live weights after the given (0-based) iterations."""

    def __init__(self, iters):
        self.iters, self.snapshots = set(iters), []

    def after_step(self):
        if self.trainer.iter in self.iters:
            self.snapshots.append(copy.deepcopy(self.trainer.model.state_dict()))


class _Kill(HookBase):
    def __init__(self, at):
        self.at = at

    def before_step(self):
        if self.trainer.iter == self.at:
            raise KeyboardInterrupt("simulated kill")


@pytest.fixture(scope="module")
def one_image_dataset(synthetic_root):
    """One training image: the data order cannot differ between an interrupted and an uninterrupted run
    (Detectron2 does not checkpoint the sampler position)."""
    records = [r for r in DatasetCatalog.get("tiny_defects_train") if r["annotations"]][:1]
    name = "swa_one_image_train"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: copy.deepcopy(records))
        MetadataCatalog.get(name).set(**{k: v for k, v in MetadataCatalog.get("tiny_defects_train").as_dict().items()
                                         if k not in ("name",)})
    return name


RUN_OPTS = ["SOLVER.MAX_ITER", "2", "SOLVER.SWA.ENABLED", "True", "SOLVER.SWA.NUM_CYCLES", "2",
            "SOLVER.SWA.CYCLE_ITERS", "2", "SOLVER.SWA.BN_UPDATE_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
            "DATASETS.TEST", "()", "SEED", "5"]


def _train(cfg, hooks=(), resume=False):
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    trainer.register_hooks(list(hooks))
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def uninterrupted(one_image_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("swa_full")
    cfg = _cfg(*RUN_OPTS, "DATASETS.TRAIN", f"('{one_image_dataset}',)", "OUTPUT_DIR", str(out))
    recorder = _Recorder(iters=[3, 5])  # MAX_ITER + k * CYCLE_ITERS - 1, k = 1..2
    trainer = _train(cfg, [_Seeder(), recorder])
    return out, cfg, trainer, recorder


def test_detector_average_matches_averaged_model(uninterrupted):
    out, cfg, trainer, recorder = uninterrupted
    assert trainer.iter == trainer.max_iter == 6
    assert len(recorder.snapshots) == 2
    model = copy.deepcopy(trainer.model)
    oracle = AveragedModel(model, use_buffers=True)
    for snap in recorder.snapshots:
        model.load_state_dict(snap)
        oracle.update_parameters(model)
    swa_hook = [h for h in trainer._hooks if type(h).__name__ == "SWAHook"][0]
    assert swa_hook.state.num_averaged == 2
    _assert_same_floats(swa_hook.state.average, oracle.module.state_dict())

    swa = torch.load(out / "model_swa.pth", weights_only=True)
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert swa["iteration"] == final["iteration"] == 5
    params = dict(trainer.model.named_parameters())
    for k, v in swa["model"].items():
        if k in params:  # weights: exactly the average
            assert torch.equal(v, swa_hook.state.average[k]), k
    # model_final holds the live weights of the last iteration
    for k, v in recorder.snapshots[-1].items():
        assert torch.equal(final["model"][k], v), k
    # trainable BN: the statistics were recomputed for the averaged weights
    bn_means = [k for k in swa["model"] if k.endswith("running_mean")]
    assert bn_means and any(not torch.allclose(swa["model"][k], swa_hook.state.average[k]) for k in bn_means)
    # the checkpoint carries the SWA state (the snapshot after iteration 5 joins at the end of training)
    assert final["trainer"]["hooks"]["SWAHook"]["num_averaged"] == 1


def test_kill_and_resume_gives_the_same_model_swa(uninterrupted, tmp_path):
    out_full, cfg_full, _, _ = uninterrupted
    cfg = cfg_full.clone()
    cfg.OUTPUT_DIR = str(tmp_path)
    # killed at iteration 5 (snapshot 1 in memory only); the last checkpoint is model_0000003.pth,
    # written right at the end of the first cycle
    with pytest.raises(KeyboardInterrupt):
        _train(cfg, [_Seeder(), _Kill(at=5)])
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    assert not (tmp_path / "model_swa.pth").exists()
    trainer = _train(cfg, [_Seeder()], resume=True)
    assert trainer.start_iter == 4
    a = torch.load(out_full / "model_swa.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "model_swa.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_two_cpu_processes_with_swa(synthetic_root, tmp_path):
    # --dist-url auto: a free port (the default port is shared by every run of the same user)
    proc = run_train_net(["--config-file", SMALL_CONFIG, "--num-gpus", "2", "--dist-url", "auto", *TINY_OPTS, "SOLVER.MAX_ITER", "2",
                          "SOLVER.SWA.ENABLED", "True", "SOLVER.SWA.NUM_CYCLES", "2", "SOLVER.SWA.CYCLE_ITERS", "1",
                          "SOLVER.SWA.BN_UPDATE_ITERS", "1", "DATASETS.TRAIN", "('synthetic_defects_train',)",
                          "DATASETS.TEST", "('synthetic_defects_val',)", "OUTPUT_DIR", str(tmp_path)], synthetic_root)
    assert sorted(p.name for p in tmp_path.glob("model_swa*")) == ["model_swa.pth"]
    assert not list(tmp_path.glob("*.tmp-*"))
    import json

    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert {"bbox", "swa/bbox"} <= set(results) and "AP" in results["swa/bbox"]
    assert {k for k in results if k.startswith("swa/")} == {"swa/" + k for k in results if "/" not in k}
    assert "SWA: averaged snapshot 2/2" in proc.stdout + proc.stderr
    swa = torch.load(tmp_path / "model_swa.pth", weights_only=True)
    assert swa["num_averaged"] == 2 and swa["iteration"] == 3
