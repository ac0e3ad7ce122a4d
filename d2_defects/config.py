"""Config keys added by d2_defects.

``add_defects_config(cfg)`` adds every key this project uses, each under a clearly named node with a
one-line comment.  Keys are only *added*; a YAML file or command-line option naming a key that does not
exist still fails with Detectron2's usual ``KeyError: 'Non-existent config key: ...'``.
"""
import torch
from detectron2.config import CfgNode as CN


def add_defects_config(cfg):
    """
    Add the d2_defects keys to a Detectron2 config (in place) and return it.

    Args:
        cfg (CfgNode): usually ``detectron2.config.get_cfg()``.
    """
    # Device: the code is device-agnostic; default to CUDA when present, else CPU.
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

    _add_swa_config(cfg)
    return cfg


def _add_swa_config(cfg):
    """Stochastic weight averaging (d2_defects/engine/swa.py)."""
    cfg.SOLVER.SWA = CN()
    # Train NUM_CYCLES * CYCLE_ITERS more iterations after SOLVER.MAX_ITER and average the cycle ends.
    cfg.SOLVER.SWA.ENABLED = False
    # Number of cycles = number of snapshots in the average.
    cfg.SOLVER.SWA.NUM_CYCLES = 12
    # Length of one cycle (iterations; e.g. one epoch).
    cfg.SOLVER.SWA.CYCLE_ITERS = 1000
    # LR at the first iteration of each cycle (multiple of SOLVER.BASE_LR).
    cfg.SOLVER.SWA.LR_START_FACTOR = 1.0
    # LR at the last iteration of each cycle, whose weights join the average (multiple of SOLVER.BASE_LR).
    cfg.SOLVER.SWA.LR_END_FACTOR = 0.01
    # Shape of the LR fall within a cycle: "linear" or "cosine" (half cosine wave).
    cfg.SOLVER.SWA.LR_SHAPE = "linear"
    # Training batches used to recompute BatchNorm statistics of the averaged model (0: skip; FrozenBN: no-op).
    cfg.SOLVER.SWA.BN_UPDATE_ITERS = 200
