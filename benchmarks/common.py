"""Shared runner for the benchmarks: time a candidate against a baseline in the same process.

Machines are noisy, so results are ratios of medians over interleaved repeats, never single absolute
times. Typical use::

    from common import compare, print_table
    rows = [compare("train step", baseline=lambda: ..., candidate=lambda: ..., repeats=20, warmup=3)]
    print_table(rows)
"""
import argparse
import gc
import statistics
import time

import torch

__all__ = ["Timing", "compare", "measure", "print_table", "base_parser"]


class Timing(dict):
    """Result of :func:`compare`: name, baseline/candidate medians (s), ratio candidate/baseline."""

    def __str__(self):
        return (f"{self['name']}: baseline {self['baseline_median'] * 1e3:.2f} ms, candidate "
                f"{self['candidate_median'] * 1e3:.2f} ms, ratio {self['ratio']:.3f}x")


def _sync(device):
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn, repeats=10, warmup=2, device=None):
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def compare(name, baseline, candidate, repeats=10, warmup=2, device=None):
    """
    Time ``candidate()`` against ``baseline()`` in this process. The calls are interleaved
    (baseline, candidate, baseline, ...) so that drifts in machine load hit both equally.

    Returns:
        Timing: with ``ratio`` = median(candidate) / median(baseline) (< 1 means the candidate is faster).
    """
    for _ in range(warmup):
        baseline()
        candidate()
    _sync(device)
    tb, tc = [], []
    for _ in range(repeats):
        for fn, acc in ((baseline, tb), (candidate, tc)):
            gc.collect()
            t0 = time.perf_counter()
            fn()
            _sync(device)
            acc.append(time.perf_counter() - t0)
    mb, mc = statistics.median(tb), statistics.median(tc)
    return Timing(name=name, baseline_median=mb, candidate_median=mc, ratio=mc / mb, repeats=repeats,
                  baseline_times=tb, candidate_times=tc)


def print_table(rows, title=None):
    """Print a markdown table of :class:`Timing` rows (paste into BENCHMARKS.md)."""
    if title:
        print(f"\n### {title}\n")
    print("| what | baseline (median) | candidate (median) | ratio candidate/baseline | repeats |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['baseline_median'] * 1e3:.2f} ms | {r['candidate_median'] * 1e3:.2f} ms "
              f"| {r['ratio']:.3f}x | {r['repeats']} |")


def base_parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per side (median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls per side")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p
