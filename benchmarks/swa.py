"""
Time per training iteration over the SWA phase, with the SWA hook vs without it (same model, same
data, same process, interleaved repeats).

One repeat = one SWA cycle of ``--cycle-iters`` training iterations; the candidate additionally runs
the hook's per-iteration check and averages the weights at the cycle end. Real cycles are one epoch
(hundreds to thousands of iterations), so the overhead measured with a short cycle is an upper bound.

    DETECTRON2_DATASETS=/work/main/datasets python benchmarks/swa.py --cycle-iters 4 --repeats 5 --threads 2
"""
import os
import tempfile

import torch
from common import base_parser, compare, print_table
from detectron2.utils.events import EventStorage

import d2_defects  # noqa: F401  registers the synthetic dataset
from d2_defects.engine.launch import load_config
from d2_defects.engine.swa import SWAHook
from d2_defects.engine.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic", "cascade_r18_cpu.yaml")


def main():
    p = base_parser(__doc__)
    p.add_argument("--cycle-iters", type=int, default=4, help="SOLVER.SWA.CYCLE_ITERS of the timed cycles")
    p.add_argument("--size", type=int, default=128, help="short side of the training images (px)")
    p.add_argument("--batch", type=int, default=2, help="images per batch")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    k = args.cycle_iters
    cfg = load_config(CONFIG, [
        "MODEL.DEVICE", args.device, "INPUT.MIN_SIZE_TRAIN", f"({args.size},)", "INPUT.MAX_SIZE_TRAIN",
        str(2 * args.size), "SOLVER.IMS_PER_BATCH", str(args.batch), "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.MAX_ITER", "0", "SOLVER.SWA.ENABLED", "True", "SOLVER.SWA.NUM_CYCLES", "100000",
        "SOLVER.SWA.CYCLE_ITERS", str(k), "DATASETS.TEST", "()", "OUTPUT_DIR", tempfile.mkdtemp(prefix="swa_bench_"),
    ])
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    hook = [h for h in trainer._hooks if isinstance(h, SWAHook)][0]
    done = {"iters": 0}  # iterations run with the hook (its own iteration counter)

    def cycle(with_swa):
        for _ in range(k):
            if with_swa:
                trainer.iter = done["iters"]
                hook.before_step()
                done["iters"] += 1
            trainer._trainer.run_step()

    with EventStorage(0) as trainer.storage:
        trainer._trainer.storage = trainer.storage
        row = compare(f"SWA cycle of {k} iterations (R18 cascade, {args.size} px, batch {args.batch})",
                      baseline=lambda: cycle(False), candidate=lambda: cycle(True),
                      repeats=args.repeats, warmup=args.warmup, device=args.device)
    print_table([row], title="SWA hook overhead per iteration")
    print(f"snapshots averaged during the run: {hook.state.num_averaged}")


if __name__ == "__main__":
    main()
