"""``setup()`` and ``main()`` shared by ``train_net.py`` and the tools."""
import difflib
import logging
import os
import sys

from detectron2.config import get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import CheckpointError, DefectCheckpointer
from ..config import add_defects_config
from ..data.coco import DatasetError
from ..data.manifest import register_from_config

__all__ = ["UserError", "load_config", "setup", "main", "run"]

logger = logging.getLogger("d2_defects")

# Errors caused by the user's input: reported as one line, without a traceback.
USER_ERRORS = (CheckpointError, DatasetError, FileNotFoundError)


class UserError(ValueError):
    """A problem in the user's config, command line or files, reported without a traceback."""


def _all_keys(cfg, prefix=""):
    for k, v in cfg.items():
        if isinstance(v, dict):
            yield from _all_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _config_error(cfg, where, err):
    msg = str(err.args[0]) if err.args else str(err)
    hint = ""
    if "Non-existent" in msg:
        key = msg.rsplit(":", 1)[-1].strip()
        close = difflib.get_close_matches(key, list(_all_keys(cfg)), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
    return UserError(f"config error in {where}: {msg}{hint}")


def load_config(config_file, opts=()):
    """get_cfg -> add_defects_config -> merge file -> merge opts (not frozen)."""
    cfg = add_defects_config(get_cfg())
    if config_file:
        if not os.path.isfile(config_file):
            raise UserError(f"config file not found: {config_file}")
        try:
            cfg.merge_from_file(config_file)
        except (KeyError, ValueError, AssertionError, TypeError) as e:
            raise _config_error(cfg, config_file, e) from None
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise _config_error(cfg, "the command-line options", e) from None
    return cfg


def setup(args):
    """Build the frozen config for ``args`` and set up logging/output (Detectron2's default_setup)."""
    opts = list(args.opts)
    if getattr(args, "manifest", None):  # train_net.py --manifest PATH
        opts = ["DATASETS.MANIFEST", os.path.abspath(args.manifest)] + opts
    cfg = load_config(args.config_file, opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2_defects", abbrev_name="d2d")
    try:
        register_from_config(cfg)  # manifest datasets, in every process
    except DatasetError:
        raise
    except ValueError as e:  # a wrong DATASETS.* value, named in the message
        raise UserError(f"config error: {e}") from None
    return cfg


def _check_tta_config(cfg):
    from ..modeling.tta import tta_options

    try:
        tta_options(cfg)
    except ValueError as e:
        raise UserError(f"config error: {e}") from None


def main(args):
    from .trainer import Trainer

    cfg = setup(args)
    if args.eval_only:
        if not cfg.MODEL.WEIGHTS and not args.resume:
            raise UserError("--eval-only needs MODEL.WEIGHTS path/to/model.pth (or --resume)")
        if cfg.TEST.AUG.ENABLED:
            _check_tta_config(cfg)
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
    """``main(args)``, with user errors reported as one ``ERROR: ...`` line and exit code 2.

    A module-level function (not a decorator) so that ``launch`` can pickle it for worker processes.
    """
    try:
        return main(args)
    except (UserError, ValueError) + USER_ERRORS as e:
        # ValueError: the project's config checks at model/evaluator build time name the key
        if isinstance(e, FileNotFoundError) and e.filename:
            msg = f"file not found: {e.filename}"
        else:
            msg = str(e)
        print(f"ERROR: {msg}", file=sys.stderr, flush=True)
        if comm.get_world_size() > 1:
            # other ranks may wait in a collective: exit at once so that the launcher stops them
            os._exit(2)
        sys.exit(2)
