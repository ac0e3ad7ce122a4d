#!/usr/bin/env python
"""Training time per iteration of a candidate config against a baseline config, as `make demo` runs them.

    python benchmarks/train_speed.py --baseline configs/synthetic/cascade_r18_cpu.yaml \
        --candidate configs/synthetic/recipe_r18_cpu.yaml --iters 80 --repeats 2

Each repeat trains the baseline, then the candidate, for --iters iterations (`train_net.py`, the configs' own
settings otherwise: data loader, threads, batch; no evaluation) into fresh folders, interleaved so that drifts
in machine load hit both. Reported: the median of Detectron2's per-iteration `time` (metrics.json, after the
first 20 iterations) over the repeats, and the ratio candidate / baseline. A config's whole schedule then takes
about ratio x the baseline's. Uses the synthetic data under $DETECTRON2_DATASETS.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def iteration_times(metrics_path, skip=20):
    """Detectron2's windowed `time` values of metrics.json rows after iteration ``skip``."""
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["time"] for r in rows if "time" in r and r.get("iteration", 0) >= skip]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default=os.path.join(ROOT, "configs", "synthetic", "cascade_r18_cpu.yaml"))
    p.add_argument("--candidate", required=True, help="config to compare with the baseline")
    p.add_argument("--iters", type=int, default=80, help="iterations per run (first 20 not timed)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="overrides for both configs: KEY VALUE ...")
    args = p.parse_args()
    if args.iters <= 40:
        p.error("--iters must be > 40 (the first 20 are warm-up, metrics are written every 20)")
    configs = {"baseline": args.baseline, "candidate": args.candidate}
    times = {k: [] for k in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, config in configs.items():
                out = os.path.join(tmp, f"{name}-{r}")
                cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", config,
                       "SOLVER.MAX_ITER", str(args.iters), "SOLVER.CHECKPOINT_PERIOD", str(10 ** 6),
                       "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", *args.opts, "OUTPUT_DIR", out]
                subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                times[name] += iteration_times(os.path.join(out, "metrics.json"))
                print(f"repeat {r} {name}: median {statistics.median(times[name]):.3f} s/iter so far", flush=True)
    base, cand = statistics.median(times["baseline"]), statistics.median(times["candidate"])
    print(f"\n| what | baseline: {os.path.basename(args.baseline)} | candidate: {os.path.basename(args.candidate)} "
          "| ratio | repeats |")
    print("|---|---|---|---|---|")
    print(f"| s/iter (median), {args.iters} iterations | {base:.3f} | {cand:.3f} | {cand / base:.3f}x | {args.repeats} |")


if __name__ == "__main__":
    main()
