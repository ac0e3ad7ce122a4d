import logging
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_CONFIG = os.path.join(ROOT, "configs", "synthetic", "cascade_r18_cpu.yaml")

# Overrides that make the small config tiny enough for tests (seconds per run on 2 CPU cores).
TINY_OPTS = [
    "MODEL.DEVICE", "cpu",
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "160",
    "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "160",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.RPN.POST_NMS_TOPK_TEST", "32",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2", "SOLVER.BASE_LR", "0.005",
    "SOLVER.STEPS", "()", "DATALOADER.NUM_WORKERS", "0",
]

torch.set_num_threads(2)

# test oracles installed outside site-packages by bootstrap.sh (requirements-oracles.txt): e.g. sahi.slicing
ORACLES = os.path.join(sys.prefix, "oracles")
if os.path.isdir(ORACLES) and ORACLES not in sys.path:
    sys.path.append(ORACLES)


def _drop_closed_stream_handlers():
    loggers = [logging.getLogger()] + [l for l in logging.Logger.manager.loggerDict.values()
                                       if isinstance(l, logging.Logger)]
    for logger in loggers:
        for h in list(logger.handlers):
            if isinstance(h, logging.StreamHandler) and getattr(h.stream, "closed", False):
                logger.removeHandler(h)


@pytest.fixture(autouse=True)
def _no_stale_log_handlers():
    """Detectron2's ``setup_logger`` (called by tools run in-process) attaches a handler to the sys.stdout of
    that moment, which is pytest's capture stream of that test; once the test ends the stream is closed and
    every later log call prints a "Logging error" traceback. Drop such handlers around every test."""
    _drop_closed_stream_handlers()
    yield
    _drop_closed_stream_handlers()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic defect dataset (16 train + 6 val images), registered under ``tiny_defects_*``."""
    from d2_defects.data import generate_dataset, register_synthetic_defects

    root = tmp_path_factory.mktemp("datasets")
    generate_dataset(str(root / "synthetic_defects"), num_images=22, seed=3, val_fraction=6 / 22, progress=False)
    register_synthetic_defects(str(root), prefix="tiny_defects")
    return str(root)


def run_train_net(args, datasets_root, timeout=600, check=True):
    """Run ``train_net.py`` in a subprocess with ``DETECTRON2_DATASETS=datasets_root``."""
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root, OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train_net.py")] + [str(a) for a in args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train_net.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
