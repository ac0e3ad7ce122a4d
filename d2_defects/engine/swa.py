"""
Stochastic weight averaging (SWA) for Detectron2 training.

After the regular schedule (``SOLVER.MAX_ITER`` iterations) training continues for
``SOLVER.SWA.NUM_CYCLES`` cycles of ``SOLVER.SWA.CYCLE_ITERS`` iterations each. Within a cycle the
learning rate falls from ``LR_START_FACTOR`` to ``LR_END_FACTOR`` times ``SOLVER.BASE_LR``
(:class:`SWALRMultiplier`); the weights after the last iteration of every cycle join an equal-weight
running average (:class:`SWAState`, kept by :class:`SWAHook`). At the end, BatchNorm statistics are
recomputed for the averaged weights (if the model has trainable BN), the averaged model is written to
``OUTPUT_DIR/model_swa.pth`` and evaluated next to the live model (``swa/bbox/AP`` next to ``bbox/AP``).

Iterations are counted from 0 as in Detectron2: the snapshot of cycle ``k`` (k = 1..NUM_CYCLES) is the
weights after iteration ``MAX_ITER + k * CYCLE_ITERS - 1``.
"""
import contextlib
import logging
import math
import os
from collections import OrderedDict

import torch
from detectron2.engine import HookBase
from detectron2.solver import LRMultiplier
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from fvcore.nn.precise_bn import get_bn_modules, update_bn_stats

from ..checkpoint import CheckpointError, DefectCheckpointer
from ..utils.errors import ConfigError
from ..utils.modules import unwrap_model

__all__ = [
    "AverageError",
    "average_checkpoint_files",
    "SWAState",
    "SWAHook",
    "SWALRMultiplier",
    "swa_lr_factor",
    "swa_max_iter",
    "swa_snapshot_iters",
    "validate_swa_config",
    "unwrap_model",
    "averaged_weights",
    "average_state_dicts",
    "build_swa_hook",
    "SWA_PREFIX",
    "UntaggedCheckpointer",
    "flatten_results",
    "merge_prefixed_results",
    "build_averaged_eval_function",
]

# a child of "detectron2" so that messages reach the handlers (log.txt) that train_net's setup installs
logger = logging.getLogger("detectron2.d2_defects.swa")

# Prefix of the SWA model's evaluation results: "swa/bbox/AP" next to the live "bbox/AP".
SWA_PREFIX = "swa/"
_LR_SHAPES = ("linear", "cosine")




def validate_swa_config(cfg):
    """Raise :class:`ConfigError` naming the key if a ``SOLVER.SWA`` value is invalid (no-op when disabled)."""
    swa = cfg.SOLVER.SWA
    if not swa.ENABLED:
        return
    checks = [
        ("NUM_CYCLES", isinstance(swa.NUM_CYCLES, int) and swa.NUM_CYCLES >= 1, "an integer >= 1"),
        ("CYCLE_ITERS", isinstance(swa.CYCLE_ITERS, int) and swa.CYCLE_ITERS >= 1, "an integer >= 1"),
        ("LR_START_FACTOR", swa.LR_START_FACTOR >= 0, ">= 0"),
        ("LR_END_FACTOR", swa.LR_END_FACTOR >= 0, ">= 0"),
        ("BN_UPDATE_ITERS", isinstance(swa.BN_UPDATE_ITERS, int) and swa.BN_UPDATE_ITERS >= 0, "an integer >= 0"),
        ("LR_SHAPE", swa.LR_SHAPE in _LR_SHAPES, f"one of {_LR_SHAPES}"),
    ]
    for key, ok, what in checks:
        if not ok:
            raise ConfigError(f"SOLVER.SWA.{key} must be {what}, got {getattr(swa, key)!r}")
    if cfg.SOLVER.MAX_ITER < 0:
        raise ConfigError(f"SOLVER.MAX_ITER must be >= 0 with SWA, got {cfg.SOLVER.MAX_ITER}")


def swa_max_iter(cfg):
    """Total training iterations: ``MAX_ITER`` (+ ``NUM_CYCLES * CYCLE_ITERS`` with SWA enabled)."""
    validate_swa_config(cfg)
    if not cfg.SOLVER.SWA.ENABLED:
        return cfg.SOLVER.MAX_ITER
    return cfg.SOLVER.MAX_ITER + cfg.SOLVER.SWA.NUM_CYCLES * cfg.SOLVER.SWA.CYCLE_ITERS


def swa_snapshot_iters(cfg):
    """0-based iterations after which a snapshot joins the average (one per cycle)."""
    swa = cfg.SOLVER.SWA
    return [cfg.SOLVER.MAX_ITER + k * swa.CYCLE_ITERS - 1 for k in range(1, swa.NUM_CYCLES + 1)]


def swa_lr_factor(j, cycle_iters, start, end, shape="linear"):
    """
    LR multiplier (relative to the base LR) at iteration ``j`` of the SWA phase (``j`` from 0).

    Within every cycle of ``cycle_iters`` iterations the factor goes from ``start`` (first iteration of
    the cycle) to ``end`` (last iteration, the one whose weights join the average):
    ``linear`` interpolates linearly, ``cosine`` follows half a cosine wave. A cycle of one iteration
    uses ``end``.
    """
    pos = j % cycle_iters
    t = pos / (cycle_iters - 1) if cycle_iters > 1 else 1.0
    if shape == "linear":
        return start + (end - start) * t
    if shape == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ConfigError(f"SOLVER.SWA.LR_SHAPE must be one of {_LR_SHAPES}, got {shape!r}")


class SWALRMultiplier(LRMultiplier):
    """
    Detectron2's :class:`LRMultiplier` for the first ``max_iter`` iterations (the regular schedule,
    unchanged), then the cyclic SWA factor of :func:`swa_lr_factor` for the iterations after it.
    """

    def __init__(self, optimizer, multiplier, max_iter, cycle_iters, start_factor, end_factor,
                 shape="linear", last_iter=-1):
        self._swa_args = (cycle_iters, start_factor, end_factor, shape)
        super().__init__(optimizer, multiplier, max_iter, last_iter=last_iter)

    @classmethod
    def from_config(cls, cfg, regular):
        """Extend ``regular`` (the :class:`LRMultiplier` built for ``cfg``) with the SWA phase."""
        if not isinstance(regular, LRMultiplier):
            raise ConfigError(
                f"SOLVER.SWA.ENABLED needs a Detectron2 LRMultiplier scheduler, got {type(regular).__name__} "
                f"(SOLVER.LR_SCHEDULER_NAME={cfg.SOLVER.LR_SCHEDULER_NAME})"
            )
        validate_swa_config(cfg)
        swa = cfg.SOLVER.SWA
        # The regular scheduler has already set each group's "initial_lr"; this one reuses it.
        return cls(regular.optimizer, regular._multiplier, regular._max_iter, swa.CYCLE_ITERS,
                   swa.LR_START_FACTOR, swa.LR_END_FACTOR, swa.LR_SHAPE, last_iter=regular.last_epoch - 1)

    def get_lr(self):
        if self.last_epoch < self._max_iter:
            return super().get_lr()
        factor = swa_lr_factor(self.last_epoch - self._max_iter, *self._swa_args)
        return [base_lr * factor for base_lr in self.base_lrs]


class SWAState:
    """
    An equal-weight running average of model state dicts (parameters and floating-point buffers).

    ``update(sd)`` after ``n`` updates sets ``avg = avg + (sd - avg) / (n + 1)`` (computed as
    ``lerp``, like ``torch.optim.swa_utils``); integer buffers (e.g. BN's ``num_batches_tracked``) take
    the latest value. Checkpointable through ``state_dict``/``load_state_dict``.
    """

    def __init__(self):
        self.num_averaged = 0
        self.average = OrderedDict()

    @torch.no_grad()
    def update(self, state_dict):
        """Add one snapshot. ``state_dict`` (dict[str, Tensor]) must have the names/shapes of the first."""
        if self.num_averaged == 0:
            self.average = OrderedDict((k, v.detach().clone()) for k, v in state_dict.items())
        else:
            if set(state_dict) != set(self.average):
                raise ValueError("SWA snapshot has different parameter names than the running average")
            weight = 1.0 / (self.num_averaged + 1)
            for k, v in state_dict.items():
                avg = self.average[k]
                v = v.detach().to(avg.device)
                if avg.is_floating_point():
                    avg.lerp_(v, weight)
                else:
                    avg.copy_(v)
        self.num_averaged += 1

    def state_dict(self):
        return {"num_averaged": self.num_averaged, "average": OrderedDict(self.average)}

    def load_state_dict(self, state):
        self.num_averaged = int(state["num_averaged"])
        self.average = OrderedDict(state["average"])


def average_state_dicts(state_dicts):
    """Equal-weight average of model state dicts (an iterable), as :class:`SWAState` computes it."""
    state = SWAState()
    for sd in state_dicts:
        state.update(sd)
    return state.average


@contextlib.contextmanager
def averaged_weights(model, weights):
    """
    Load ``weights`` (a state dict) into ``model`` (unwrapped from DDP) for the ``with`` block and
    restore the live weights, buffers and train/eval mode on exit, also on exceptions.

    Yields:
        nn.Module: the unwrapped model holding ``weights``.
    """
    module = unwrap_model(model)
    live = OrderedDict((k, v.detach().clone()) for k, v in module.state_dict().items())
    training = module.training
    module.load_state_dict(weights)
    try:
        yield module
    finally:
        module.load_state_dict(live)
        module.train(training)


class AverageError(CheckpointError):
    """Bad input; reported as one ``ERROR:`` line."""


def _load_model_weights(path):
    # DefectCheckpointer's loader: weights_only, a clear error naming the file
    data = DefectCheckpointer(torch.nn.Module())._load_file(path)
    model = data["model"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise AverageError(f"{path}: 'model' is not a dict of tensors")
    return model


def average_checkpoint_files(paths, progress=True):
    """
    Equal-weight average of the ``model`` weights of the checkpoint files ``paths`` (list[str], at least one),
    loaded like ``DefectCheckpointer`` does (weights only). Files whose parameter names or shapes differ raise
    :class:`AverageError` naming both files (``tools/average_checkpoints.py``).

    Returns:
        dict[str, Tensor]: the averaged state dict.
    """
    state = SWAState()
    first = None
    from tqdm import tqdm

    for path in tqdm(paths, desc="averaging", disable=not progress):
        if not os.path.isfile(path):
            raise AverageError(f"checkpoint not found: {path}")
        weights = _load_model_weights(path)
        if first is None:
            first = (path, {k: tuple(v.shape) for k, v in weights.items()})
        else:
            ref_path, ref = first
            missing, extra = sorted(set(ref) - set(weights)), sorted(set(weights) - set(ref))
            if missing or extra:
                raise AverageError(
                    f"{path}: parameter names differ from {ref_path}: missing {missing[:5]}, extra {extra[:5]}"
                    + (" ..." if len(missing) > 5 or len(extra) > 5 else "")
                )
            for k, v in weights.items():
                if tuple(v.shape) != ref[k]:
                    raise AverageError(f"{path}: {k} has shape {tuple(v.shape)}, {ref_path} has {ref[k]}")
        state.update(weights)
    return state.average


class UntaggedCheckpointer(DefectCheckpointer):
    """A checkpointer whose saves (``model_swa.pth``, ``model_ema.pth``) do not move ``last_checkpoint``."""

    def tag_last_checkpoint(self, last_filename_basename):
        # model_swa.pth must not become the checkpoint that --resume continues from
        pass


class SWAHook(HookBase):
    """
    Keeps the SWA running average during training and finalizes it after the last cycle.

    Snapshots are taken lazily: the weights after a cycle's last iteration ``i`` are averaged at
    ``before_step(i + 1)`` (or in ``after_train``). The weights do not change in between, and a
    checkpoint written at ``after_step(i)`` then restores exactly the state from which the snapshot is
    taken, whatever the hook order.

    Args:
        model (nn.Module): the trained model (possibly DDP-wrapped).
        start_iter (int): ``SOLVER.MAX_ITER``, the first iteration of the SWA phase.
        num_cycles, cycle_iters (int): ``SOLVER.SWA.NUM_CYCLES``, ``SOLVER.SWA.CYCLE_ITERS``.
        output_dir (str): where ``model_swa.pth`` is written ("" or None: not written).
        bn_data_loader (iterable or None): training batches for the BN recompute.
        bn_update_iters (int): number of batches for the BN recompute (0: skip).
        eval_function (callable or None): ``eval_function(model) -> dict`` evaluates the averaged model;
            its results are stored with the ``swa/`` prefix in the trainer's storage.
    """

    def __init__(self, model, start_iter, num_cycles, cycle_iters, output_dir=None, bn_data_loader=None,
                 bn_update_iters=0, eval_function=None):
        self._model = model
        self._start_iter = start_iter
        self._num_cycles = num_cycles
        self._cycle_iters = cycle_iters
        self._output_dir = output_dir
        self._bn_data_loader = bn_data_loader
        self._bn_update_iters = bn_update_iters
        self._eval_function = eval_function
        self.state = SWAState()
        self.swa_results = None

    def _cycles_done(self, num_iters_done):
        return min(max(num_iters_done - self._start_iter, 0) // self._cycle_iters, self._num_cycles)

    def _catch_up(self, num_iters_done):
        expected = self._cycles_done(num_iters_done)
        if self.state.num_averaged == expected:
            return
        if self.state.num_averaged != expected - 1:
            raise RuntimeError(
                f"SWA: {num_iters_done} iterations done, so {expected - 1} snapshots should have been "
                f"averaged, but the state holds {self.state.num_averaged} (resumed from a checkpoint "
                "written without SOLVER.SWA.ENABLED or with other SWA settings?)"
            )
        self.state.update(unwrap_model(self._model).state_dict())
        logger.info(f"SWA: averaged snapshot {self.state.num_averaged}/{self._num_cycles} "
                    f"(weights after iteration {num_iters_done - 1})")

    def before_step(self):
        self._catch_up(self.trainer.iter)

    def after_train(self):
        if self.trainer.iter < self.trainer.max_iter:
            return  # training stopped early (exception): nothing to finalize
        self._catch_up(min(self.trainer.iter, self.trainer.max_iter))
        if self.state.num_averaged == self._num_cycles:
            self.finalize()

    def finalize(self):
        """BN recompute, ``model_swa.pth``, evaluation. Runs on every rank (the averaged model is
        identical on all ranks, BN statistics are taken from rank 0)."""
        with averaged_weights(self._model, self.state.average) as module:
            self._update_bn(module)
            if comm.get_world_size() > 1:
                for v in module.state_dict().values():
                    torch.distributed.broadcast(v, src=0)
            if comm.is_main_process() and self._output_dir:
                ckpt = UntaggedCheckpointer(module, save_dir=self._output_dir)
                ckpt.save("model_swa", iteration=self.trainer.max_iter - 1, num_averaged=self.state.num_averaged)
            comm.synchronize()
            if self._eval_function is not None:
                results = self._eval_function(module)
                self.swa_results = results
                flat = {SWA_PREFIX + k: v for k, v in flatten_results(results).items()}
                if flat and comm.is_main_process():
                    self.trainer.storage.put_scalars(**flat, smoothing_hint=False)
                comm.synchronize()

    def _update_bn(self, module):
        if self._bn_update_iters <= 0 or self._bn_data_loader is None:
            return
        module.train()
        if not get_bn_modules(module):
            return  # FrozenBN / GN / no BN: nothing to recompute
        logger.info(f"SWA: recomputing BN statistics on {self._bn_update_iters} batches")
        with EventStorage(), torch.no_grad():  # discard the losses the forward logs
            update_bn_stats(module, iter(self._bn_data_loader), self._bn_update_iters)

    def state_dict(self):
        return self.state.state_dict()

    def load_state_dict(self, state_dict):
        self.state.load_state_dict(state_dict)


def flatten_results(results, prefix=""):
    """``{"bbox": {"AP": 1}}`` -> ``{"bbox/AP": 1}`` (the names Detectron2's EvalHook stores)."""
    out = {}
    for k, v in (results or {}).items():
        if isinstance(v, dict):
            out.update(flatten_results(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def merge_prefixed_results(live, other, prefix):
    """``live`` results plus ``other`` results under ``<prefix><key>`` top-level keys (replacing earlier ones)."""
    merged = OrderedDict(live or {})
    for k, v in (other or {}).items():
        merged[prefix + k] = v
    return merged


def merge_swa_results(live, swa):
    """``live`` results plus ``swa`` results under ``swa/<key>`` top-level keys."""
    return merge_prefixed_results(live, swa, SWA_PREFIX)


def build_averaged_eval_function(trainer, folder, prefix, label):
    """
    ``eval_function(model)`` for an averaged model (SWA, EMA) of a Detectron2 trainer: evaluates with
    ``trainer.test`` into ``OUTPUT_DIR/<folder>/<dataset>`` (the live model's ``inference/`` files are kept)
    and reports the results under ``<prefix>`` next to the live ones in ``trainer._last_eval_results`` and
    ``OUTPUT_DIR/eval_results.json``.
    """
    from ..utils.report import write_eval_report

    cfg = trainer.cfg

    def eval_function(model):
        evaluators = [type(trainer).build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, folder, name))
                      for name in cfg.DATASETS.TEST]
        results = type(trainer).test(cfg, model, evaluators)
        if not results:
            return results
        merged = merge_prefixed_results(getattr(trainer, "_last_eval_results", None), results, prefix)
        trainer._last_eval_results = merged
        if comm.is_main_process():
            write_eval_report(merged, cfg.OUTPUT_DIR)
            logger.info(f"{label} model evaluated; results under " + ", ".join(prefix + k for k in results))
        return results

    return eval_function


def build_swa_hook(trainer):
    """
    The :class:`SWAHook` for a Detectron2 ``DefaultTrainer`` (``trainer.cfg``): BN batches from
    ``trainer.build_train_loader`` (built now, before training, so that runs are reproducible), the
    SWA model evaluated with ``trainer.test`` and reported next to the live results in
    ``trainer._last_eval_results`` and ``OUTPUT_DIR/eval_results.json``.
    """
    cfg = trainer.cfg
    swa = cfg.SOLVER.SWA
    bn_loader = None
    if swa.BN_UPDATE_ITERS > 0 and get_bn_modules(unwrap_model(trainer.model)):
        bn_cfg = cfg.clone()
        bn_cfg.defrost()
        bn_cfg.DATALOADER.NUM_WORKERS = 0  # as detectron2's PreciseBN hook: a few hundred batches at most
        bn_loader = trainer.build_train_loader(bn_cfg)

    eval_function = build_averaged_eval_function(trainer, "inference_swa", SWA_PREFIX, "SWA")

    return SWAHook(trainer.model, cfg.SOLVER.MAX_ITER, swa.NUM_CYCLES, swa.CYCLE_ITERS,
                   output_dir=cfg.OUTPUT_DIR, bn_data_loader=bn_loader, bn_update_iters=swa.BN_UPDATE_ITERS,
                   eval_function=eval_function)
