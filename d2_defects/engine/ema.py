"""
Exponential moving average (EMA) of the weights during training (``MODEL_EMA.*``).

After every training iteration ``t`` (counted from 1) the average moves towards the live weights:
``ema = d_t * ema + (1 - d_t) * w`` with ``d_t = DECAY * (1 - exp(-t / WARMUP_ITERS))`` (the ramp
Ultralytics and timm use, so that the random initialisation is forgotten quickly; ``WARMUP_ITERS`` 0:
``d_t = DECAY``). The first update copies the weights (as ``torch.optim.swa_utils.AveragedModel`` does).
Every floating-point entry of the model's state dict is averaged, BatchNorm running statistics included
(``AveragedModel(use_buffers=True)``, timm's ``ModelEmaV2``); integer buffers take the latest value.

The average is kept by :class:`EMAHook`, saved in every checkpoint (the trainer's hook state) and restored
by ``--resume``; at the end of training it is written to ``OUTPUT_DIR/model_ema.pth`` and, with
``MODEL_EMA.EVAL``, evaluated next to the live model (``ema/bbox/AP`` next to ``bbox/AP``; also at every
``TEST.EVAL_PERIOD``). It reuses SWA's swap-in/restore context (:func:`~.swa.averaged_weights`), writer and
result merging.
"""
import math
from collections import OrderedDict

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..utils.errors import ConfigError
from .swa import UntaggedCheckpointer, averaged_weights, build_averaged_eval_function, flatten_results, unwrap_model

__all__ = ["EMAState", "EMAHook", "ema_decay", "validate_ema_config", "build_ema_hook", "EMA_PREFIX"]

EMA_PREFIX = "ema/"


def validate_ema_config(cfg):
    """Raise :class:`ConfigError` naming the ``MODEL_EMA`` key whose value cannot work (no-op when disabled)."""
    ema = cfg.MODEL_EMA
    if not ema.ENABLED:
        return
    if not 0.0 <= float(ema.DECAY) < 1.0:
        raise ConfigError(f"MODEL_EMA.DECAY must be in [0, 1), got {ema.DECAY!r}")
    if not isinstance(ema.WARMUP_ITERS, (int, float)) or ema.WARMUP_ITERS < 0:
        raise ConfigError(f"MODEL_EMA.WARMUP_ITERS must be >= 0 (iterations), got {ema.WARMUP_ITERS!r}")


def ema_decay(num_updates, decay, warmup_iters):
    """The decay of update number ``num_updates`` (1-based): ``decay * (1 - exp(-num_updates / warmup_iters))``."""
    if warmup_iters <= 0:
        return float(decay)
    return float(decay) * (1.0 - math.exp(-num_updates / float(warmup_iters)))


class EMAState:
    """
    The moving average of a model's state dict. ``update(sd, decay, iteration)`` folds in the weights after
    ``iteration`` (once per iteration: a repeated iteration is ignored). Checkpointable.
    """

    def __init__(self):
        self.num_updates = 0
        self.last_iter = -1  # the iteration whose weights were folded in last
        self.average = OrderedDict()

    @torch.no_grad()
    def update(self, state_dict, decay, iteration):
        if iteration <= self.last_iter:
            return False
        if self.num_updates == 0:
            self.average = OrderedDict((k, v.detach().clone()) for k, v in state_dict.items())
        else:
            for k, v in state_dict.items():
                avg = self.average[k]
                if avg.is_floating_point():
                    avg.lerp_(v.detach().to(avg.device), 1.0 - decay)
                else:
                    avg.copy_(v)
        self.num_updates += 1
        self.last_iter = int(iteration)
        return True

    def state_dict(self):
        return {"num_updates": self.num_updates, "last_iter": self.last_iter, "average": OrderedDict(self.average)}

    def load_state_dict(self, state):
        self.num_updates = int(state["num_updates"])
        self.last_iter = int(state["last_iter"])
        self.average = OrderedDict(state["average"])


class EMAHook(HookBase):
    """
    Keeps the EMA of ``model`` during training, writes ``model_ema.pth`` and evaluates it.

    The weights after iteration ``i`` are folded in lazily, at ``before_step(i + 1)`` (or before an
    evaluation, or in ``after_train``): a checkpoint written in ``after_step(i)`` then holds a state from
    which ``--resume`` continues exactly as the uninterrupted run, whatever the hook order.

    Args:
        model (nn.Module): the trained model (possibly DDP-wrapped).
        decay, warmup_iters: ``MODEL_EMA.DECAY``, ``MODEL_EMA.WARMUP_ITERS``.
        output_dir (str): where ``model_ema.pth`` is written ("" or None: not written).
        eval_function (callable or None): ``eval_function(model) -> dict`` evaluates the averaged model.
        eval_period (int): also evaluate every ``eval_period`` iterations (``TEST.EVAL_PERIOD``; 0: at the end).
    """

    def __init__(self, model, decay, warmup_iters=0, output_dir=None, eval_function=None, eval_period=0):
        self._model = model
        self._decay = float(decay)
        self._warmup = float(warmup_iters)
        self._output_dir = output_dir
        self._eval_function = eval_function
        self._eval_period = int(eval_period)
        self.state = EMAState()
        self.ema_results = None

    def _catch_up(self, num_iters_done):
        if num_iters_done < 1:
            return
        decay = ema_decay(self.state.num_updates + 1, self._decay, self._warmup)
        self.state.update(unwrap_model(self._model).state_dict(), decay, num_iters_done - 1)

    def before_step(self):
        self._catch_up(self.trainer.iter)

    def after_step(self):
        nxt = self.trainer.iter + 1
        if self._eval_function is not None and self._eval_period > 0 and nxt % self._eval_period == 0 \
                and nxt != self.trainer.max_iter:
            self._catch_up(nxt)
            self._evaluate()

    def after_train(self):
        if self.trainer.iter < self.trainer.max_iter:
            return  # stopped early (exception): nothing to finalise
        self._catch_up(self.trainer.max_iter)
        self._sync()
        if comm.is_main_process() and self._output_dir and self.state.num_updates:
            with averaged_weights(self._model, self.state.average) as module:
                UntaggedCheckpointer(module, save_dir=self._output_dir).save(
                    "model_ema", iteration=self.trainer.max_iter - 1, num_updates=self.state.num_updates)
        comm.synchronize()
        if self._eval_function is not None:
            self._evaluate()

    def _sync(self):
        # BN statistics differ between processes (per-process BN): every rank uses rank 0's average
        if comm.get_world_size() > 1 and self.state.num_updates:
            for v in self.state.average.values():
                torch.distributed.broadcast(v, src=0)

    def _evaluate(self):
        if not self.state.num_updates:
            return
        self._sync()
        with averaged_weights(self._model, self.state.average) as module:
            results = self._eval_function(module)
        self.ema_results = results
        flat = {EMA_PREFIX + k: v for k, v in flatten_results(results).items()}
        if flat and comm.is_main_process():
            self.trainer.storage.put_scalars(**flat, smoothing_hint=False)
        comm.synchronize()

    def state_dict(self):
        return self.state.state_dict()

    def load_state_dict(self, state_dict):
        self.state.load_state_dict(state_dict)


def build_ema_hook(trainer):
    """The :class:`EMAHook` of a trainer with ``MODEL_EMA.ENABLED`` (its evaluation: ``MODEL_EMA.EVAL``)."""
    cfg = trainer.cfg
    validate_ema_config(cfg)
    ema = cfg.MODEL_EMA
    eval_function = build_averaged_eval_function(trainer, "inference_ema", EMA_PREFIX, "EMA") if ema.EVAL else None
    return EMAHook(trainer.model, ema.DECAY, ema.WARMUP_ITERS, output_dir=cfg.OUTPUT_DIR,
                   eval_function=eval_function, eval_period=cfg.TEST.EVAL_PERIOD)
