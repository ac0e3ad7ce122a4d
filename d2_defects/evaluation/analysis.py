"""Per-class analysis of a :class:`DefectEvalResult`: statistics, confusion matrix and PNG plots.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend change).
Class names the default font cannot draw (Chinese ones) use installed fonts that can, through matplotlib's
font fallback; without such a font the plots say "class <i>" and ``class_index.md`` lists index -> name.
"""
import os

import cv2
import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..utils.fonts import plot_labels, renders
from .ap import box_iou_xywh

__all__ = ["class_statistics", "confusion_matrix", "image_errors", "write_analysis_plots", "PLOT_FILES",
           "CLASS_INDEX_FILE"]

PLOT_FILES = {
    "per_class_ap": "per_class_ap.png",
    "ap_vs_num_annotations": "ap_vs_num_annotations.png",
    "ap_vs_box_size": "ap_vs_box_size.png",
    "ap_vs_aspect_ratio": "ap_vs_aspect_ratio.png",
    "pr_curves": "pr_curves.png",
    "confusion_matrix": "confusion_matrix.png",
    "worst_images": "worst_images.png",
}
CLASS_INDEX_FILE = "class_index.md"  # index -> class name, written when the plots label classes by index


def class_statistics(result):
    """
    Per class: number of (non-crowd) annotations, mean box size sqrt(w*h) in pixels and mean aspect
    ratio long/short side (nan without annotations).
    """
    gt = result.gt
    K = len(result.class_names)
    ok = ~gt["crowd"]
    cls, wh = gt["cls"][ok], gt["boxes"][ok, 2:]
    count = np.bincount(cls, minlength=K)[:K]
    size = np.sqrt(wh[:, 0] * wh[:, 1])
    aspect = np.maximum(wh[:, 0], wh[:, 1]) / np.maximum(np.minimum(wh[:, 0], wh[:, 1]), 1e-6)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_size = np.bincount(cls, size, minlength=K)[:K] / count
        mean_aspect = np.bincount(cls, aspect, minlength=K)[:K] / count
    return {"num_annotations": count, "mean_size": mean_size, "mean_aspect": mean_aspect}


def _image_matching(result, score_threshold, iou_threshold):
    """
    Class-agnostic greedy matching per image of detections with score >= ``score_threshold``:
    each detection (highest score first) takes the unmatched box with IoU >= ``iou_threshold``,
    a box of its own class first, else the one of highest IoU.

    Yields per image: (image index, gt indices, det indices, det -> matched gt index or -1).
    """
    gt, dt = result.gt, result.dt
    ok_gt = ~gt["crowd"]
    g_by_img = {}
    for g in np.nonzero(ok_gt)[0]:
        g_by_img.setdefault(int(gt["img"][g]), []).append(g)
    d_sel = np.nonzero(dt["scores"] >= score_threshold)[0]
    d_by_img = {}
    for d in d_sel[np.argsort(-dt["scores"][d_sel], kind="stable")]:
        d_by_img.setdefault(int(dt["img"][d]), []).append(d)
    for i in range(len(result.image_ids)):
        gs = np.asarray(g_by_img.get(i, []), dtype=np.int64)
        ds = np.asarray(d_by_img.get(i, []), dtype=np.int64)
        match = np.full(len(ds), -1, dtype=np.int64)
        if len(gs) and len(ds):
            iou = box_iou_xywh(dt["boxes"][ds][:, None], gt["boxes"][gs][None], False)
            used = np.zeros(len(gs), dtype=bool)
            for j in range(len(ds)):
                cand = (iou[j] >= iou_threshold) & ~used
                if not cand.any():
                    continue
                same = cand & (gt["cls"][gs] == dt["cls"][ds[j]])
                pool = same if same.any() else cand
                g = int(np.argmax(np.where(pool, iou[j], -1)))
                used[g] = True
                match[j] = g
        yield i, gs, ds, match


def confusion_matrix(result, score_threshold=0.5, iou_threshold=0.5):
    """
    Returns:
        ndarray: (K, K + 2) counts. Row = class; column j < K: ground-truth boxes of the row's class
        detected as class j; column K ("missed"): its boxes no detection matched; column K + 1
        ("background"): detections of the row's class that matched no box.
    """
    K = len(result.class_names)
    cm = np.zeros((K, K + 2), dtype=np.int64)
    gt, dt = result.gt, result.dt
    for _, gs, ds, match in _image_matching(result, score_threshold, iou_threshold):
        hit = np.zeros(len(gs), dtype=bool)
        for j, g in enumerate(match):
            if g >= 0:
                cm[gt["cls"][gs[g]], dt["cls"][ds[j]]] += 1
                hit[g] = True
            else:
                cm[dt["cls"][ds[j]], K + 1] += 1
        for g in np.nonzero(~hit)[0]:
            cm[gt["cls"][gs[g]], K] += 1
    return cm


def image_errors(result, score_threshold=0.5, iou_threshold=0.5):
    """Per image: (missed boxes, false detections, wrong-class detections), each (num_images,)."""
    n = len(result.image_ids)
    missed, false, wrong = np.zeros(n, int), np.zeros(n, int), np.zeros(n, int)
    gt, dt = result.gt, result.dt
    for i, gs, ds, match in _image_matching(result, score_threshold, iou_threshold):
        missed[i] = len(gs) - int((match >= 0).sum())
        false[i] = int((match < 0).sum())
        ok = match >= 0
        wrong[i] = int((gt["cls"][gs[match[ok]]] != dt["cls"][ds[ok]]).sum())
    return missed, false, wrong


def _save(fig, path):
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def _labelled_bar(ax, names, values, ylabel, title):
    x = np.arange(len(names))
    shown = np.nan_to_num(values, nan=0.0)
    bars = ax.bar(x, shown, color=["#bbbbbb" if np.isnan(v) else "#3b75af" for v in values])
    for b, v in zip(bars, values):
        ax.annotate("n/a" if np.isnan(v) else f"{v:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def _scatter(path, result, names, xs, xlabel, title, logx=False):
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.add_subplot()
    ap = result.class_ap
    ok = np.isfinite(xs) & np.isfinite(ap)
    ax.scatter(xs[ok], ap[ok], s=60, c="#3b75af")
    for name, x, y in zip(np.asarray(names)[ok], xs[ok], ap[ok]):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
    if logx and ok.any() and np.all(xs[ok] > 0):
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("AP (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def write_analysis_plots(result, output_dir, score_threshold=0.5, iou_threshold=0.5, num_worst=8,
                         progress=None):
    """
    Write the PNGs of :data:`PLOT_FILES` to ``output_dir`` (which must exist).

    Args:
        result (DefectEvalResult): with ``records`` (for image files).
        score_threshold (float): detections below are ignored by the confusion matrix and the gallery.
        iou_threshold (float): IoU for the confusion matrix and the gallery.
        num_worst (int): images in the gallery.
    Returns:
        dict[str, str]: plot name -> path; also ``"class_index"`` -> :data:`CLASS_INDEX_FILE` when no
        installed font draws the class names and the plots label classes "class <i>".
    """
    names, rc, indexed = plot_labels(result.class_names)
    with matplotlib.rc_context(rc):
        paths = _write_plots(result, names, indexed, output_dir, score_threshold, iou_threshold, num_worst,
                             progress)
    if indexed:
        paths["class_index"] = os.path.join(output_dir, CLASS_INDEX_FILE)
        with open(paths["class_index"], "w", encoding="utf-8") as f:
            f.write("| label in the plots | class |\n|---|---|\n")
            f.writelines(f"| {lab} | {name} |\n" for lab, name in zip(names, result.class_names))
    return paths


def _write_plots(result, names, indexed, output_dir, score_threshold, iou_threshold, num_worst, progress):
    K = len(names)
    settings = result.settings
    iou_desc = f"IoU {settings.iou.name} ({', '.join(settings.iou.labels)}), AP {settings.ap_method}"
    if indexed:
        iou_desc += f"; class names in {CLASS_INDEX_FILE}"
    paths = {k: os.path.join(output_dir, v) for k, v in PLOT_FILES.items()}
    steps = list(paths)
    it = progress(steps, desc="plots") if progress else steps
    stats = class_statistics(result)
    key = f" ({CLASS_INDEX_FILE})" if indexed else ""
    for step in it:
        path = paths[step]
        if step == "per_class_ap":
            fig = Figure(figsize=(max(6, 0.9 * K + 2), 5), layout="constrained")
            ax = fig.add_subplot()
            _labelled_bar(ax, names, result.class_ap, "AP (%)",
                          f"Per-class AP, mAP {result.mAP:.1f}, weighted {result.weighted_mAP:.1f} ({iou_desc})")
            ax.set_ylim(0, 105)
            _save(fig, path)
        elif step == "ap_vs_num_annotations":
            _scatter(path, result, names, stats["num_annotations"].astype(float),
                     "number of annotations (log scale)", "AP vs number of annotations per class" + key, logx=True)
        elif step == "ap_vs_box_size":
            _scatter(path, result, names, stats["mean_size"], "mean box size sqrt(w*h) (pixels)",
                     "AP vs mean box size per class" + key)
        elif step == "ap_vs_aspect_ratio":
            _scatter(path, result, names, stats["mean_aspect"], "mean aspect ratio (long side / short side)",
                     "AP vs mean aspect ratio per class" + key)
        elif step == "pr_curves":
            _pr_curves(path, result, names, iou_desc)
        elif step == "confusion_matrix":
            _confusion(path, result, names, confusion_matrix(result, score_threshold, iou_threshold),
                       score_threshold, iou_threshold, key)
        elif step == "worst_images":
            _worst_images(path, result, names, score_threshold, iou_threshold, num_worst, key)
    return paths


def _pr_curves(path, result, names, iou_desc):
    K = len(names)
    cols = min(3, max(K, 1))
    rows = max(1, int(np.ceil(K / cols)))
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows), layout="constrained")
    labels = result.settings.iou.labels
    shown = sorted({0, len(labels) // 2, len(labels) - 1})
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        c = result.curves[k]
        if c["num_gt"] == 0:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes)
        else:
            for t in shown:
                tp = np.cumsum(c["tp"][t])
                fp = np.cumsum(c["fp"][t])
                rec = np.r_[0, tp / c["num_gt"]]
                prec = np.r_[1, tp / np.maximum(tp + fp, 1)]
                ax.plot(rec, prec, label=f"IoU {labels[t]}: AP {result.ap[k, t]:.1f}")
            ax.legend(fontsize=8, loc="lower left")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"{name} ({c['num_gt']} GT, {len(c['scores'])} det)", fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Precision-recall per class ({iou_desc})")
    _save(fig, path)


def _confusion(path, result, names, cm, score_threshold, iou_threshold, key):
    K = len(names)
    cols = list(names) + ["missed", "background"]
    fig = Figure(figsize=(1.0 * (K + 2) + 3, 0.8 * K + 2.5), layout="constrained")
    ax = fig.add_subplot()
    row_sum = np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(cm / row_sum, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for r in range(K):
        for c in range(K + 2):
            frac = cm[r, c] / row_sum[r, 0]
            ax.text(c, r, str(cm[r, c]), ha="center", va="center", fontsize=9,
                    color="white" if frac > 0.6 else "black")
    ax.set_xticks(range(K + 2))
    ax.set_xticklabels(cols, rotation=30, ha="right")
    ax.set_yticks(range(K))
    ax.set_yticklabels(names)
    ax.set_xlabel("predicted class | missed: box not detected | background: detection on no box")
    ax.set_ylabel("ground-truth class (background: detected class)")
    ax.set_title(f"Confusion matrix (score >= {score_threshold:g}, IoU >= {iou_threshold:g}; counts){key}")
    fig.colorbar(im, ax=ax, label="fraction of row")
    _save(fig, path)


def _worst_images(path, result, names, score_threshold, iou_threshold, num_worst, key):
    missed, false, wrong = image_errors(result, score_threshold, iou_threshold)
    err = missed + false + wrong
    order = np.argsort(-err, kind="stable")[: max(1, num_worst)]
    cols = min(4, len(order))
    rows = int(np.ceil(len(order) / cols))
    fig = Figure(figsize=(4.5 * cols, 4.0 * rows + 0.6), layout="constrained")
    gt, dt = result.gt, result.dt
    for n, i in enumerate(order):
        ax = fig.add_subplot(rows, cols, n + 1)
        rec = result.records[i]
        img = cv2.imread(rec.get("file_name", ""), cv2.IMREAD_COLOR)
        if img is None:
            img = np.full((rec.get("height", 100), rec.get("width", 100), 3), 200, np.uint8)
            ax.text(0.5, 0.5, "image file not found", ha="center", va="center", transform=ax.transAxes)
        else:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        ax.imshow(img)
        for g in np.nonzero(gt["img"] == i)[0]:
            x, y, w, h = gt["boxes"][g]
            ax.add_patch(Rectangle((x, y), w, h, fill=False, ec="lime", lw=1.5))
            ax.text(x, y + h, names[gt["cls"][g]], color="lime", fontsize=7, va="top")
        for d in np.nonzero((dt["img"] == i) & (dt["scores"] >= score_threshold))[0]:
            x, y, w, h = dt["boxes"][d]
            ax.add_patch(Rectangle((x, y), w, h, fill=False, ec="red", lw=1.2, ls="--"))
            ax.text(x, y, f"{names[dt['cls'][d]]} {dt['scores'][d]:.2f}", color="red", fontsize=7, va="bottom")
        title = os.path.basename(rec.get("file_name", ""))
        if not title or not renders(title):
            title = f"image id {rec['image_id']}"
        ax.set_title(f"{title}\n"
                     f"{missed[i]} missed, {false[i]} false, {wrong[i]} wrong class", fontsize=9)
        ax.axis("off")
    fig.suptitle("Worst images (green: ground truth, red dashed: detections with score >= "
                 f"{score_threshold:g}){key}")
    _save(fig, path)
