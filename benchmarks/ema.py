"""
Time per training iteration with the EMA hook vs without it (same model, same data, same process,
interleaved repeats). The hook folds the weights into the average once per iteration (``before_step``).

    DETECTRON2_DATASETS=$PWD/datasets python benchmarks/ema.py --repeats 20 --threads 2

Prints the train-step ratio (noisy on a loaded machine) and, measured directly, the cost of one EMA update
relative to the median train step (target: <= 3%).
"""
import os
import tempfile

import torch
from common import base_parser, compare, measure, print_table
from detectron2.utils.events import EventStorage

import d2_defects  # noqa: F401  registers the synthetic dataset
from d2_defects.engine.ema import EMAHook
from d2_defects.engine.launch import load_config
from d2_defects.engine.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic", "cascade_r18_cpu.yaml")


def main():
    p = base_parser(__doc__)
    p.add_argument("--size", type=int, default=256, help="short side of the training images (px); the demo's")
    p.add_argument("--batch", type=int, default=4, help="images per batch; the demo's")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(CONFIG, [
        "MODEL.DEVICE", args.device, "INPUT.MIN_SIZE_TRAIN", f"({args.size},)", "SOLVER.IMS_PER_BATCH",
        str(args.batch), "DATALOADER.NUM_WORKERS", "0", "SOLVER.MAX_ITER", "100000", "SOLVER.WARMUP_ITERS", "0",
        "MODEL_EMA.ENABLED", "True", "MODEL_EMA.EVAL", "False", "DATASETS.TEST", "()",
        "OUTPUT_DIR", tempfile.mkdtemp(prefix="ema_bench_"),
    ])
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    hook = [h for h in trainer._hooks if isinstance(h, EMAHook)][0]
    it = {"n": 0}

    def step(with_ema):
        if with_ema:
            it["n"] += 1
            trainer.iter = it["n"]
            hook.before_step()  # folds in the weights after the previous step
        trainer._trainer.run_step()

    with EventStorage(0) as trainer.storage:
        trainer._trainer.storage = trainer.storage
        row = compare(f"train step (R18 cascade, {args.size} px, batch {args.batch}): with EMA vs without",
                      baseline=lambda: step(False), candidate=lambda: step(True),
                      repeats=args.repeats, warmup=args.warmup, device=args.device)
        train_step, _ = measure(trainer._trainer.run_step, repeats=args.repeats, warmup=args.warmup,
                                device=args.device)

    def one_update():
        it["n"] += 1
        trainer.iter = it["n"]
        hook.before_step()

    update, _ = measure(one_update, repeats=50, warmup=5, device=args.device)
    n = sum(v.numel() for v in hook.state.average.values())
    print_table([row], title="EMA hook overhead per iteration")
    print(f"\ntrain step (median): {train_step * 1e3:.1f} ms; one EMA update ({n / 1e6:.1f} M values): "
          f"{update * 1e3:.2f} ms = {100 * update / train_step:.2f}% of a train step (target <= 3%)")


if __name__ == "__main__":
    main()
