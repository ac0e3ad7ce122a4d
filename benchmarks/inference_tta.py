"""Cost of test-time augmentation relative to plain inference (same process, interleaved medians).

    python benchmarks/inference_tta.py --repeats 5 --threads 2

Rows: TTA with only the identity view (overhead of the wrapper and of loading full-resolution images, target
<= 1.05x), then with horizontal flip (2 views, expected ~2x) and with two sizes + flips + merge by WBF.
Random weights and a random 256x192 image: the cost depends on the number of views, not on the weights.
"""
import os

import numpy as np
import torch

from common import base_parser, compare, print_table

import d2_defects  # noqa: E402,F401
from d2_defects.engine.launch import load_config  # noqa: E402
from d2_defects.inference import BatchPredictor  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic", "cascade_r18_cpu.yaml")


def main():
    p = base_parser(__doc__)
    p.add_argument("--size", default="256x192", help="image WxH (default 256x192)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.split("x"))
    base = ["MODEL.DEVICE", args.device, "INPUT.MIN_SIZE_TEST", "256", "INPUT.MAX_SIZE_TEST", "600"]
    torch.manual_seed(0)
    plain = BatchPredictor(load_config(CONFIG, base))
    model = plain.model
    image = [np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)]
    variants = {
        "TTA identity only (1 view)": ["TEST.AUG.MIN_SIZES", "(256,)", "TEST.AUG.MAX_SIZE", "600",
                                       "TEST.AUG.FLIP", "False"],
        "TTA + hflip, NMS merge (2 views)": ["TEST.AUG.MIN_SIZES", "(256,)", "TEST.AUG.MAX_SIZE", "600"],
        "TTA 2 sizes + h/v flip, WBF merge (6 views)": ["TEST.AUG.MIN_SIZES", "(224, 288)", "TEST.AUG.MAX_SIZE",
                                                        "600", "TEST.AUG.VFLIP", "True", "TEST.AUG.MERGE", "wbf"],
    }
    rows = []
    for name, opts in variants.items():
        tta = BatchPredictor(load_config(CONFIG, base + ["TEST.AUG.ENABLED", "True"] + opts), model=model)
        rows.append(compare(name, lambda: plain(image), lambda: tta(image), repeats=args.repeats,
                            warmup=args.warmup, device=args.device))
    print_table(rows, title=f"test-time augmentation vs plain inference, {w}x{h}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
