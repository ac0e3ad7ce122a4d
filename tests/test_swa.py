"""SWA: the average against torch.optim.swa_utils, the LR schedule value by value, kill-and-resume, DDP."""
import copy
import json
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


def test_frozen_bn_model_swa_is_the_running_average(one_image_dataset, tmp_path, monkeypatch, caplog):
    """FrozenBN: no BN recompute (neither fvcore's update_bn_stats nor its log line); model_swa.pth holds
    exactly the running average, parameters and (frozen) buffers, which is AveragedModel's."""
    import logging

    from detectron2.layers import FrozenBatchNorm2d

    from d2_defects.engine import swa as swa_module

    calls = []
    real_update_bn = swa_module.update_bn_stats
    monkeypatch.setattr(swa_module, "update_bn_stats", lambda *a, **k: calls.append(1) or real_update_bn(*a, **k))
    swa_logger = logging.getLogger(swa_module.logger.name)
    caplog.set_level(logging.INFO, logger=swa_logger.name)
    swa_logger.addHandler(caplog.handler)  # the "detectron2" logger does not propagate to the root
    cfg = _cfg(*RUN_OPTS, "MODEL.RESNETS.NORM", "FrozenBN", "SOLVER.MAX_ITER", "1", "SOLVER.SWA.CYCLE_ITERS", "1",
               "SOLVER.CHECKPOINT_PERIOD", "100", "DATASETS.TRAIN", f"('{one_image_dataset}',)",
               "OUTPUT_DIR", str(tmp_path))
    recorder = _Recorder(iters=[1, 2])  # 3 iterations; snapshots after iterations 1 and 2
    try:
        trainer = _train(cfg, [_Seeder(), recorder])
    finally:
        swa_logger.removeHandler(caplog.handler)
    model = trainer.model
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert not swa_module.get_bn_modules(model)
    messages = [r.getMessage() for r in caplog.records]
    assert "SWA: averaged snapshot 2/2 (weights after iteration 2)" in messages
    assert not any("recomputing BN" in m for m in messages) and calls == []

    swa_hook = [h for h in trainer._hooks if isinstance(h, swa_module.SWAHook)][0]
    saved = torch.load(tmp_path / "model_swa.pth", weights_only=True)
    assert saved["num_averaged"] == swa_hook.state.num_averaged == 2
    assert saved["model"].keys() == swa_hook.state.average.keys() == model.state_dict().keys()
    for k, v in saved["model"].items():
        assert torch.equal(v, swa_hook.state.average[k]), k
    oracle_model = copy.deepcopy(model)
    oracle = AveragedModel(oracle_model, use_buffers=True)
    for snap in recorder.snapshots:
        oracle_model.load_state_dict(snap)
        oracle.update_parameters(oracle_model)
    _assert_same_floats(saved["model"], oracle.module.state_dict())
    frozen = [k for k in saved["model"] if k.endswith("running_var")]
    assert frozen and all(torch.equal(saved["model"][k], recorder.snapshots[0][k]) for k in frozen)


# ---------------------------------------------------------------- train_net.py, 2 CPU processes

DDP_DS = ["DATASETS.TRAIN", "('synthetic_defects_train',)", "DATASETS.TEST", "('synthetic_defects_val',)",
          # every proposal scores: the few-iteration model's detections are compared below
          "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]


@pytest.fixture(scope="module")
def ddp_swa_run(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("swa_ddp")
    # --dist-url auto: a free port (the default port is shared by every run of the same user)
    proc = run_train_net(["--config-file", SMALL_CONFIG, "--num-gpus", "2", "--dist-url", "auto", *TINY_OPTS, *DDP_DS,
                          "SOLVER.MAX_ITER", "2", "SOLVER.SWA.ENABLED", "True", "SOLVER.SWA.NUM_CYCLES", "2",
                          "SOLVER.SWA.CYCLE_ITERS", "1", "SOLVER.SWA.BN_UPDATE_ITERS", "1", "OUTPUT_DIR", str(out)],
                         synthetic_root)
    return out, proc.stdout + proc.stderr


def test_two_cpu_processes_with_swa(ddp_swa_run):
    out, log = ddp_swa_run
    assert sorted(p.name for p in out.glob("model_swa*")) == ["model_swa.pth"]
    assert not list(out.glob("*.tmp-*"))
    results = json.loads((out / "eval_results.json").read_text())
    assert {"bbox", "swa/bbox"} <= set(results) and "AP" in results["swa/bbox"]
    assert {k for k in results if k.startswith("swa/")} == {"swa/" + k for k in results if "/" not in k}
    assert "SWA: averaged snapshot 2/2" in log
    swa = torch.load(out / "model_swa.pth", weights_only=True)
    assert swa["num_averaged"] == 2 and swa["iteration"] == 3
    # only rank 0 writes model_swa.pth; rank 1's log (same loggers) shows that it ran the SWA phase too
    rank0, rank1 = (out / "log.txt").read_text(), (out / "log.txt.rank1").read_text()
    save_line = f"Saving checkpoint to {out / 'model_swa.pth'}"
    assert rank0.count(save_line) == 1 and save_line not in rank1
    assert "fvcore.common.checkpoint INFO: No checkpoint found" in rank1
    assert "SWA: averaged snapshot 2/2" in rank1 and "SWA: recomputing BN statistics" in rank1
    # metrics.json: the SWA results next to the live ones, the values of eval_results.json
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    last = [r for r in records if "swa/bbox/AP" in r]
    assert len(last) == 1 and "bbox/AP" in last[0]
    for k, v in results["swa/bbox"].items():
        assert last[0]["swa/bbox/" + k] == pytest.approx(v, nan_ok=True), k


def _detections(path):
    return sorted(json.loads(path.read_text()), key=lambda d: (d["image_id"], d["category_id"], d["score"], d["bbox"]))


def test_eval_only_on_model_swa_reproduces_swa_results(ddp_swa_run, synthetic_root, tmp_path):
    """``--eval-only MODEL.WEIGHTS model_swa.pth`` (one process) gives the swa/ results of training and the same
    detections. During training each rank evaluated its own shard of the val images with its own copy of the
    averaged, BN-recomputed model, so equal detections on every image also mean every rank held model_swa.pth."""
    out, _ = ddp_swa_run
    run_train_net(["--config-file", SMALL_CONFIG, "--eval-only", *TINY_OPTS, *DDP_DS,
                   "MODEL.WEIGHTS", str(out / "model_swa.pth"), "OUTPUT_DIR", str(tmp_path)], synthetic_root)
    swa = json.loads((out / "eval_results.json").read_text())["swa/bbox"]
    evaluated = json.loads((tmp_path / "eval_results.json").read_text())["bbox"]
    assert swa.keys() == evaluated.keys()
    for k in swa:
        assert evaluated[k] == pytest.approx(swa[k], abs=1e-6, nan_ok=True), k
    a = _detections(out / "inference_swa" / "synthetic_defects_val" / "coco_instances_results.json")
    b = _detections(tmp_path / "inference" / "synthetic_defects_val" / "coco_instances_results.json")
    val_ids = {r["image_id"] for r in DatasetCatalog.get("tiny_defects_val")}
    assert len(val_ids) >= 2 and {d["image_id"] for d in a} == val_ids  # both ranks' shards
    assert a == b
