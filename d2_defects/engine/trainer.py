"""The project's trainer: Detectron2's ``DefaultTrainer`` with CPU-DDP support, atomic checkpoints,
an evaluator per test dataset and an evaluation report written next to the logs."""
import logging
import os
import weakref
from collections import OrderedDict

import torch
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer, TrainerBase
from detectron2.engine.defaults import create_ddp_model
from detectron2.engine.hooks import EvalHook, PeriodicCheckpointer, PeriodicWriter
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import DefectCheckpointer
from ..evaluation import DefectEvaluator, FastCOCOEvaluator
from ..modeling.freeze import freeze_model
from ..modeling.postprocess import check_postprocess_keys_used
from ..utils.report import write_eval_report
from .ema import build_ema_hook
from .swa import SWALRMultiplier, build_swa_hook, swa_max_iter
from .unfreeze import build_unfreeze_hook

__all__ = ["Trainer", "ddp_kwargs", "average_bn_buffers", "BNBufferSync"]


def ddp_kwargs(cfg):
    """
    Arguments for ``create_ddp_model``. Detectron2 passes ``device_ids=[local_rank]``, which DDP rejects
    for CPU modules; ``device_ids=None`` is what DDP expects there (gloo backend). ``broadcast_buffers`` stays
    off (Detectron2's choice): the BatchNorm statistics are averaged over the processes by
    :class:`BNBufferSync` before each checkpoint and evaluation instead.
    """
    kwargs = {"broadcast_buffers": False}
    if torch.device(cfg.MODEL.DEVICE).type == "cpu":
        kwargs["device_ids"] = None
    return kwargs


def _bn_buffers(model):
    from torch.nn.modules.batchnorm import _NormBase

    return [b for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats
            for b in (m.running_mean, m.running_var) if b is not None]


@torch.no_grad()
def average_bn_buffers(model):
    """
    Average the BatchNorm running statistics (``running_mean``, ``running_var`` of every ``BatchNorm*`` /
    ``SyncBatchNorm`` module) over the processes of the default process group, in place. With per-process
    BatchNorm each process otherwise keeps statistics of its own images, and the model rank 0 saves is not the
    model the other ranks evaluate with. A no-op with one process or without such modules (FrozenBN, GN).
    Returns the number of tensors averaged.
    """
    world = comm.get_world_size()
    buffers = _bn_buffers(model.module if hasattr(model, "module") else model)
    if world <= 1 or not buffers:
        return 0
    flat = torch.cat([b.reshape(-1).to(torch.float64) for b in buffers])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for b in buffers:
        n = b.numel()
        b.copy_(flat[offset:offset + n].view_as(b).to(b.dtype))
        offset += n
    return len(buffers)


class BNBufferSync(HookBase):
    """
    Runs :func:`average_bn_buffers` after every iteration that ends with a checkpoint (``SOLVER.CHECKPOINT_PERIOD``,
    the last iteration) or an evaluation (``TEST.EVAL_PERIOD``), before those hooks, in every process: the
    checkpoint rank 0 writes then holds the statistics every rank evaluates with.
    """

    def __init__(self, checkpoint_period, eval_period):
        self.checkpoint_period, self.eval_period = int(checkpoint_period), int(eval_period)

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if (next_iter >= self.trainer.max_iter
                or (self.checkpoint_period > 0 and next_iter % self.checkpoint_period == 0)
                or (self.eval_period > 0 and next_iter % self.eval_period == 0)):
            average_bn_buffers(self.trainer.model)


class Trainer(DefaultTrainer):
    """
    ``DefaultTrainer`` for d2_defects. Differences:

    - works with ``--num-gpus N`` on CPU-only machines (N gloo processes, see :func:`ddp_kwargs`);
    - checkpoints through :class:`DefectCheckpointer` (atomic writes, ``weights_only`` loads);
    - one COCO evaluator (and a DefectEvaluator if ``TEST.DEFECT_EVAL.ENABLED``) per ``DATASETS.TEST``
      entry, each with its own output folder;
    - evaluation results are also written to ``OUTPUT_DIR/eval_results.json`` and ``eval_tables.md``;
    - ``SOLVER.SWA.ENABLED``: stochastic weight averaging after the regular schedule (``engine/swa.py``);
    - ``MODEL_EMA.ENABLED``: an exponential moving average of the weights (``engine/ema.py``);
    - ``MODEL.FREEZE.UNTIL_ITER``: the freezing scheme only for the first iterations (``engine/unfreeze.py``);
    - with several processes, per-process BatchNorm statistics are averaged before every checkpoint and
      evaluation (:class:`BNBufferSync`), so the evaluated model is the saved one.
    """

    def __init__(self, cfg):
        # Restates DefaultTrainer.__init__ (detectron2 a59f056) so that the DDP wrapper can get
        # CPU-compatible arguments; everything else is unchanged.
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)

        model = create_ddp_model(model, **ddp_kwargs(cfg))
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DefectCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = swa_max_iter(cfg)  # MAX_ITER, + the SWA cycles when SOLVER.SWA.ENABLED
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def train(self):
        """Run training; return the last evaluation results (``OrderedDict``, possibly empty)."""
        super().train()
        return getattr(self, "_last_eval_results", OrderedDict())

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        scheduler = super().build_lr_scheduler(cfg, optimizer)
        if cfg.SOLVER.SWA.ENABLED:  # regular schedule to MAX_ITER, then the SWA cycles
            scheduler = SWALRMultiplier.from_config(cfg, scheduler)
        return scheduler

    def build_hooks(self):
        hooks = super().build_hooks()
        if comm.get_world_size() > 1:
            # before the checkpointer (rank 0 only) and the evaluation, in every process
            first = next(i for i, h in enumerate(hooks) if isinstance(h, (PeriodicCheckpointer, EvalHook)))
            hooks.insert(first, BNBufferSync(self.cfg.SOLVER.CHECKPOINT_PERIOD, self.cfg.TEST.EVAL_PERIOD))
        if self.cfg.SOLVER.SWA.ENABLED:
            # after the live evaluation (so that its results are reported next to the SWA ones),
            # before the writers (so that the SWA metrics reach metrics.json)
            writers = [i for i, h in enumerate(hooks) if isinstance(h, PeriodicWriter)]
            hooks.insert(writers[0] if writers else len(hooks), build_swa_hook(self))
        unfreeze = build_unfreeze_hook(self)
        if unfreeze is not None:
            hooks.insert(0, unfreeze)
            self._trainer.register_hooks([unfreeze.step_hook()])
        if self.cfg.MODEL_EMA.ENABLED:
            # likewise after the live evaluation and before the writers (engine/ema.py)
            writers = [i for i, h in enumerate(hooks) if isinstance(h, PeriodicWriter)]
            hooks.insert(writers[0] if writers else len(hooks), build_ema_hook(self))
        return hooks

    @classmethod
    def build_model(cls, cfg):
        """Detectron2's model, then ``MODEL.FREEZE`` applied (logs the number of trainable parameters).
        Raises a ValueError naming the key if postprocessing keys are set that the model would ignore."""
        model = super().build_model(cfg)
        check_postprocess_keys_used(cfg, model)
        if cfg.MODEL.FREEZE.UNTIL_ITER > 0:  # frozen for a while by UnfreezeHook: the optimizer gets everything
            return model
        _, _, summary = freeze_model(model, cfg.MODEL.FREEZE.SCHEME, list(cfg.MODEL.FREEZE.PATTERNS))
        logging.getLogger("detectron2").info(summary)
        return model

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        evaluators = [FastCOCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)]
        if cfg.TEST.DEFECT_EVAL.ENABLED:
            evaluators.append(DefectEvaluator(dataset_name, cfg, output_dir=output_folder))
        return DatasetEvaluators(evaluators)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Detectron2's evaluation on every ``DATASETS.TEST`` entry; with ``TEST.SLICE.ENABLED`` the model runs
        as a :class:`SlicedDetector` on the full-resolution images (the evaluation after training too)."""
        if cfg.TEST.SLICE.ENABLED:
            from ..modeling.slicing import SlicedDetector

            logging.getLogger("d2_defects").info("Running sliced inference (TEST.SLICE) ...")
            results = cls._test_full_resolution(cfg, SlicedDetector(cfg, model), "inference", evaluators)
        else:
            results = super().test(cfg, model, evaluators)
        if comm.is_main_process() and results:
            write_eval_report(results, cfg.OUTPUT_DIR)
        return results

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2's test loader with the project's mapper (reads 16-bit images, ``INPUT.HIGH_BIT_DEPTH``)."""
        from detectron2.data import build_detection_test_loader

        from ..data.mapper import build_defect_test_mapper

        return build_detection_test_loader(cfg, dataset_name, mapper=build_defect_test_mapper(cfg))

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's train loader with the defect mapper (``INPUT.VFLIP``/``ROT90``/``PHOTOMETRIC``/
        ``COPY_PASTE``, 16-bit images) and, with ``INPUT.SLICE.ENABLED``, tiles of the training images as records;
        with those keys off and 8-bit images it gives the default loader's batches."""
        from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts

        from ..data.mapper import build_defect_train_mapper

        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        mapper = build_defect_train_mapper(cfg, dataset_dicts=dataset)  # copy-paste sources: the whole images
        if cfg.INPUT.SLICE.ENABLED:
            from ..data.slicing import slice_records, slice_train_options

            dataset = slice_records(dataset, **slice_train_options(cfg), seed=max(cfg.SEED, 0))
        return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset)

    @classmethod
    def _test_full_resolution(cls, cfg, model, folder, evaluators=None):
        """Evaluate a model wrapper that resizes by itself (TTA, slicing) on images loaded at full resolution."""
        from detectron2.data import build_detection_test_loader
        from detectron2.evaluation import inference_on_dataset

        from ..data.mapper import build_defect_test_mapper

        if isinstance(evaluators, DatasetEvaluator):
            evaluators = [evaluators]
        results = OrderedDict()
        for i, name in enumerate(cfg.DATASETS.TEST):
            loader = build_detection_test_loader(cfg, name, mapper=build_defect_test_mapper(cfg, augmentations=[]))
            evaluator = evaluators[i] if evaluators is not None else \
                cls.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, folder, name))
            results[name] = inference_on_dataset(model, loader, evaluator)
        if len(results) == 1:
            results = list(results.values())[0]
        return results

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """
        Evaluate ``model`` wrapped in :class:`DefectTTA` (``TEST.AUG.*``) on every ``DATASETS.TEST`` entry.
        Images are loaded at full resolution (the augmentation resizes them). Results are keyed
        ``<task>_TTA`` and also written to ``OUTPUT_DIR/eval_tta_results.json`` and ``eval_tta_tables.md``.
        """
        from ..modeling.slicing import SlicedDetector
        from ..modeling.tta import DefectTTA

        logging.getLogger("d2_defects").info("Running inference with test-time augmentation ...")
        # with TEST.SLICE every tile's views join one merge
        tta_model = SlicedDetector(cfg, model, tta=True) if cfg.TEST.SLICE.ENABLED else DefectTTA(cfg, model)
        results = cls._test_full_resolution(cfg, tta_model, "inference_TTA")
        results = OrderedDict((k + "_TTA", v) for k, v in results.items())
        if comm.is_main_process() and results:
            write_eval_report(results, cfg.OUTPUT_DIR, prefix="eval_tta")
        return results
