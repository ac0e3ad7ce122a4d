#!/usr/bin/env python
"""Overhead of tools/ablate.py over a plain train_net.py run (same config, same seed, same threads).

    python benchmarks/ablation_overhead.py --repeats 3 --iters 100

Baseline: `train_net.py --config-file C SEED 0 ...` as a user types it. Candidate: `tools/ablate.py` with a
one-variant, one-seed plan of the same config (plan check, run, status file, report with plots). Repeats are
interleaved (baseline, candidate, baseline, ...) into fresh folders; prints the median wall times and their
ratio. Uses the synthetic data under $DETECTRON2_DATASETS (datasets/prepare_synthetic_defects.py).
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=os.path.join(ROOT, "configs", "synthetic", "cascade_r18_cpu.yaml"))
    p.add_argument("--iters", type=int, default=100, help="SOLVER.MAX_ITER of each run")
    p.add_argument("--size", type=int, default=192, help="short side of train and test images, px")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    opts = {"SOLVER.MAX_ITER": args.iters, "SOLVER.STEPS": "()", "SOLVER.WARMUP_ITERS": 20,
            "SOLVER.CHECKPOINT_PERIOD": 10 ** 6, "INPUT.MIN_SIZE_TRAIN": f"({args.size},)",
            "INPUT.MIN_SIZE_TEST": args.size, "DATALOADER.NUM_WORKERS": 1, "MODEL.DEVICE": "cpu"}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    times = {"train_net.py": [], "ablate.py": []}
    with tempfile.TemporaryDirectory() as tmp:
        plan = os.path.join(tmp, "plan.yaml")
        with open(plan, "w") as f:
            yaml.safe_dump({"base": args.config_file, "overrides": {k: str(v) for k, v in opts.items()},
                            "seeds": [0], "variants": [{"name": "run"}]}, f)
        flat = [str(x) for kv in opts.items() for x in kv]
        for r in range(args.repeats):
            for name in times:
                out = os.path.join(tmp, f"{name}-{r}")
                if name == "train_net.py":
                    cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", args.config_file,
                           *flat, "SEED", "0", "OUTPUT_DIR", out]
                else:
                    cmd = [sys.executable, os.path.join(ROOT, "tools", "ablate.py"), "--plan", plan, "--output", out,
                           "--threads", str(args.threads)]
                t0 = time.perf_counter()
                subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - t0)
                print(f"repeat {r} {name}: {times[name][-1]:.1f} s", flush=True)
    base, cand = statistics.median(times["train_net.py"]), statistics.median(times["ablate.py"])
    print("\n| what | baseline: train_net.py (median) | candidate: ablate.py (median) | ratio | repeats |")
    print("|---|---|---|---|---|")
    print(f"| one run, {args.iters} iterations + evaluation | {base:.1f} s | {cand:.1f} s | {cand / base:.3f}x | "
          f"{args.repeats} |")


if __name__ == "__main__":
    main()
