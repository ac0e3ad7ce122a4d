"""``setup()``, ``main()`` and ``run()`` shared by ``train_net.py`` and the tools."""
import glob
import logging
import os
import re

from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import DefectCheckpointer
from ..config import load_config
from ..data.manifest import register_from_config
from ..utils.errors import (  # noqa: F401  (CheckpointError, DatasetError, ConfigError: re-exported)
    CheckpointError,
    ConfigError,
    DatasetError,
    DefectsError,
    OutputExistsError,
    UsageError,
    run_cli,
)
from .validation import load_test_datasets, validate_config

__all__ = ["UserError", "load_config", "setup", "main", "run", "check_output_dir", "remove_stale_temp_files"]

logger = logging.getLogger("d2_defects")

# The historical name of the project's user-error type: every project error derives from it, so that
# ``except UserError`` catches config, dataset, checkpoint and usage errors alike.
UserError = DefectsError

# Files that mark OUTPUT_DIR as holding a training run (written by the checkpointer and the metrics writer).
RUN_MARKERS = ("model_final.pth", "last_checkpoint", "metrics.json")
# What ``--overwrite`` removes before the new run starts (so that nothing of the old run is appended to).
RUN_FILES = ("model_*.pth", "last_checkpoint", "metrics.json", "log.txt", "log.txt.rank*", "events.out.tfevents.*",
             "eval_results.json", "eval_tables.md", "eval_tta_results.json", "eval_tta_tables.md")
_TMP = re.compile(r"\.tmp-(\d+)$")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(output_dir):
    """
    Delete ``*.tmp-<pid>`` files in ``output_dir`` (left by an atomic checkpoint write that was killed)
    whose process no longer runs. Returns the list of removed paths.
    """
    removed, size = [], 0
    for path in glob.glob(os.path.join(glob.escape(output_dir), "*.tmp-*")):
        m = _TMP.search(path)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        try:
            size += os.path.getsize(path)
            os.remove(path)
            removed.append(path)
        except OSError:
            pass
    if removed:
        logger.info(f"Removed {len(removed)} temporary file(s) of interrupted saves in {output_dir} "
                    f"({size / 2**20:.1f} MiB)")
    return removed


def check_output_dir(output_dir, resume=False, overwrite=False):
    """
    Refuse to train into ``output_dir`` when it already holds a run (``model_final.pth``,
    ``last_checkpoint`` or ``metrics.json``) unless ``resume`` (continue it) or ``overwrite`` (delete that
    run's checkpoints, metrics and logs first). Always removes stale temporary files of interrupted saves.

    Raises:
        OutputExistsError: naming the folder, what was found and the flags.
    """
    if not output_dir or not os.path.isdir(output_dir):
        return
    remove_stale_temp_files(output_dir)
    if resume:
        return
    found = [f for f in RUN_MARKERS if os.path.exists(os.path.join(output_dir, f))]
    if not found:
        return
    if not overwrite:
        raise OutputExistsError(
            f"OUTPUT_DIR {output_dir} already holds a training run ({', '.join(found)}); pass --resume to continue "
            f"it, --overwrite to replace it, or set OUTPUT_DIR to another folder"
        )
    removed = []
    for pattern in RUN_FILES:
        for path in glob.glob(os.path.join(glob.escape(output_dir), pattern)):
            if os.path.isfile(path):
                os.remove(path)
                removed.append(os.path.basename(path))
    print(f"--overwrite: removed the previous run's files from {output_dir}: {', '.join(sorted(removed))}")


def setup(args):
    """
    Build the frozen config for ``args`` and set up logging/output (Detectron2's default_setup), register
    the manifest datasets and run :func:`validate_config`: every user mistake ends here, before any work.
    Training (not ``--eval-only``) also goes through :func:`check_output_dir` in the main process.
    """
    opts = list(args.opts)
    if getattr(args, "manifest", None):  # train_net.py --manifest PATH
        opts = ["DATASETS.MANIFEST", os.path.abspath(args.manifest)] + opts
    cfg = load_config(args.config_file, opts)
    cfg.freeze()
    if not getattr(args, "eval_only", False):
        if comm.is_main_process():
            check_output_dir(cfg.OUTPUT_DIR, resume=args.resume, overwrite=getattr(args, "overwrite", False))
        comm.synchronize()  # the other ranks open their logs after the old ones are gone
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2_defects", abbrev_name="d2d")
    register_from_config(cfg)  # manifest datasets, in every process
    validate_config(cfg)
    if not getattr(args, "eval_only", False):
        load_test_datasets(cfg)  # test records checked now, not after training (the training set: by the loader)
    return cfg


def main(args):
    from .trainer import Trainer

    cfg = setup(args)
    if args.eval_only:
        if not cfg.MODEL.WEIGHTS and not args.resume:
            raise UsageError("--eval-only needs MODEL.WEIGHTS path/to/model.pth (or --resume)")
        model = Trainer.build_model(cfg)
        DefectCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            results.update(Trainer.test_with_TTA(cfg, model))
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def run(args):
    """
    ``main(args)`` through the project's CLI wrapper (:func:`d2_defects.utils.errors.run_cli`): a project
    error (config, dataset, checkpoint, usage) is one ``ERROR: ...`` line and exit code 2; anything else keeps
    its traceback (also written to ``log.txt``).

    A module-level function (not a decorator) so that ``launch`` can pickle it for worker processes.
    """
    return run_cli(main, args, distributed=None)
