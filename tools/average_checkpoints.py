#!/usr/bin/env python
"""
Average the model weights of several Detectron2 checkpoints (equal weights), as the SWA hook does
during training (``SOLVER.SWA.ENABLED``), e.g. for cycles that were run without the hook:

    python tools/average_checkpoints.py out/model_0000999.pth out/model_0001999.pth ... -o out/model_swa.pth

The output holds only ``{"model": ..., "num_averaged": N, "averaged_from": [...]}`` and loads with
``train_net.py --eval-only MODEL.WEIGHTS out.pth``. Floating-point tensors are averaged; integer
buffers (BN's ``num_batches_tracked``) are taken from the last checkpoint. BatchNorm statistics are
averaged, not recomputed: for models with trainable BN prefer the hook, which recomputes them.
Checkpoints whose parameter names or shapes differ are refused.
"""
import argparse
import os
import sys

import torch

from d2_defects.engine.swa import AverageError, average_checkpoint_files
from d2_defects.utils.errors import run_cli
from d2_defects.utils.fileio import atomic_write, check_can_write


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT.pth", help="checkpoints to average (at least 2)")
    p.add_argument("-o", "--output", required=True, help="output checkpoint (.pth)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return p.parse_args(argv)


def _main(argv=None):
    args = parse_args(argv)
    if len(args.checkpoints) < 2:
        raise AverageError("give at least two checkpoints to average")
    check_can_write(args.output, args.overwrite)
    if os.path.abspath(args.output) in {os.path.abspath(p) for p in args.checkpoints}:
        raise AverageError(f"{args.output} is one of the inputs")
    average = average_checkpoint_files(args.checkpoints)
    data = {"model": average, "num_averaged": len(args.checkpoints),
            "averaged_from": [os.path.abspath(p) for p in args.checkpoints]}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    atomic_write(args.output, lambda f: torch.save(data, f))
    print(f"wrote {args.output}: average of {len(args.checkpoints)} checkpoints ({len(average)} tensors)")
    return 0


def main(argv=None):
    """Exit code: 0, or 2 after one ``ERROR:`` line for bad input."""
    return run_cli(_main, argv, exit=False)


if __name__ == "__main__":
    sys.exit(main())
