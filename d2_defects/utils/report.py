"""Evaluation reports written next to the training logs."""
import json
import math
import os

__all__ = ["write_eval_report", "format_eval_tables"]


def _fmt(v):
    return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.2f}"


def format_eval_tables(results):
    """
    Markdown tables for Detectron2 evaluation results: one summary table per dataset/task and one
    per-class table (``AP-<class>`` keys).

    Args:
        results (dict): ``{dataset: {task: {metric: value}}}`` or ``{task: {metric: value}}``.
    """
    if results and all(isinstance(v, dict) and not any(isinstance(x, dict) for x in v.values())
                       for v in results.values()):
        results = {"": results}
    lines = []
    for dataset, tasks in results.items():
        for task, metrics in tasks.items():
            title = f"{dataset} / {task}" if dataset else task
            overall = {k: v for k, v in metrics.items() if not k.startswith("AP-")}
            per_class = {k[3:]: v for k, v in metrics.items() if k.startswith("AP-")}
            lines += [f"## {title}", "", "| " + " | ".join(overall) + " |",
                      "|" + "---|" * len(overall), "| " + " | ".join(_fmt(v) for v in overall.values()) + " |", ""]
            if per_class:
                lines += ["| class | AP |", "|---|---|"]
                lines += [f"| {c} | {_fmt(v)} |" for c, v in per_class.items()]
                lines.append("")
    return "\n".join(lines)


def write_eval_report(results, output_dir, prefix="eval"):
    """Write ``<prefix>_results.json`` and ``<prefix>_tables.md`` to ``output_dir``; return their paths."""
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, f"{prefix}_results.json")
    md_path = os.path.join(output_dir, f"{prefix}_tables.md")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2, default=float)
    with open(md_path, "w") as f:
        f.write(format_eval_tables(results))
    return json_path, md_path
