"""
Freeze for the first ``MODEL.FREEZE.UNTIL_ITER`` iterations, then train everything (the logbooks' "freeze 20
epochs, then fine-tune" scheme).

With ``UNTIL_ITER > 0`` the model is built with every parameter trainable, so that the optimizer holds all of
them from the start (with their parameter group's learning rate, weight decay and momentum, as Detectron2's
optimizer builder sets them) and DistributedDataParallel registers all of them. During the frozen phase,
:class:`UnfreezeHook` drops the gradients of the frozen parameters after every backward pass (SGD and AdamW skip
a parameter without a gradient: no update, no weight decay, no momentum buffer) and keeps the BatchNorm
layers whose parameters are all frozen in eval mode (running statistics fixed, as ``FrozenBatchNorm2d`` does in
the static scheme). From iteration ``UNTIL_ITER`` on, nothing is dropped. The schedule depends only on the
iteration, so ``--resume`` before or after the switch continues exactly.

The frozen phase still computes the frozen parameters' gradients (they are discarded): it is not faster than
full training, unlike the static scheme (``UNTIL_ITER`` 0), which removes them from the graph.
"""
import logging

from detectron2.engine import HookBase
from torch import nn

from ..modeling.freeze import frozen_parameter_names
from .swa import unwrap_model

__all__ = ["UnfreezeHook", "build_unfreeze_hook"]

logger = logging.getLogger("detectron2.d2_defects.freeze")


class UnfreezeHook(HookBase):
    """
    Args:
        model (nn.Module): the trained model (possibly DDP-wrapped).
        frozen (list[str]): names of the parameters frozen until ``until_iter``.
        until_iter (int): first iteration at which they train.
    """

    def __init__(self, model, frozen, until_iter):
        module = unwrap_model(model)
        names = set(frozen)
        self._params = [p for n, p in module.named_parameters() if n in names]
        self._until = int(until_iter)
        self._bns = [m for m in module.modules()
                     if isinstance(m, nn.modules.batchnorm._BatchNorm)
                     and list(m.parameters(recurse=False))
                     and all(id(p) in {id(q) for q in self._params} for p in m.parameters(recurse=False))]
        self._announced = False

    def frozen_now(self, iteration):
        return iteration < self._until

    def before_step(self):
        if self.frozen_now(self.trainer.iter):
            for bn in self._bns:
                bn.eval()
        elif not self._announced:
            for bn in self._bns:
                bn.train()
            logger.info(f"MODEL.FREEZE.UNTIL_ITER: {len(self._params)} frozen tensors train from iteration "
                        f"{self.trainer.iter} on")
            self._announced = True

    def after_backward(self):
        self.drop_gradients(self.trainer.iter)

    def drop_gradients(self, iteration):
        if self.frozen_now(iteration):
            for p in self._params:
                p.grad = None

    def step_hook(self):
        """
        A hook for the trainer that runs the step: Detectron2's ``DefaultTrainer`` calls ``after_backward`` of
        the hooks of its inner ``SimpleTrainer``/``AMPTrainer``, not of its own.
        """
        return _DropGradients(self)


class _DropGradients(HookBase):
    def __init__(self, parent):
        self._parent = parent

    def after_backward(self):
        self._parent.drop_gradients(self.trainer.iter)


def build_unfreeze_hook(trainer):
    """The :class:`UnfreezeHook` of ``trainer`` (``MODEL.FREEZE.*``), or None when ``UNTIL_ITER`` is 0."""
    f = trainer.cfg.MODEL.FREEZE
    if f.UNTIL_ITER <= 0:
        return None
    frozen = frozen_parameter_names(unwrap_model(trainer.model), f.SCHEME, list(f.PATTERNS))
    logger.info(f"MODEL.FREEZE.SCHEME={f.SCHEME!r}: {len(frozen)} tensors frozen until iteration {f.UNTIL_ITER}")
    return UnfreezeHook(trainer.model, frozen, f.UNTIL_ITER)
