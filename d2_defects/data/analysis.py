"""Dataset statistics: per-class counts, box sizes (absolute and after the config's resize), aspect
ratios, image sizes, boxes per image and normal images, as tables and PNG plots."""
import os
from collections import Counter

import numpy as np

from .split import class_counts

__all__ = ["resize_scale", "dataset_stats", "stats_tables", "plot_stats"]

# COCO's size limits (area in pixels^2, after resize)
SMALL, MEDIUM = 32**2, 96**2


def resize_scale(h, w, short, max_size):
    """Scale of Detectron2's ``ResizeShortestEdge`` for an h x w image (short side -> ``short``)."""
    scale = short / min(h, w)
    if max_size and max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return scale


def dataset_stats(coco, short=None, max_size=None):
    """
    Args:
        coco (dict): COCO detection dict.
        short, max_size (int or None): the resize (``INPUT.MIN_SIZE_*`` / ``MAX_SIZE_*``) for the
            "after resize" numbers; None: no resize.

    Returns:
        dict of numpy arrays and counters (see :func:`stats_tables`).
    """
    sizes = {img["id"]: (img["height"], img["width"]) for img in coco["images"]}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    wh, wh_resized, cls = [], [], []
    for a in coco["annotations"]:
        h, w = sizes[a["image_id"]]
        s = resize_scale(h, w, short, max_size) if short else 1.0
        wh.append(a["bbox"][2:4])
        wh_resized.append([a["bbox"][2] * s, a["bbox"][3] * s])
        cls.append(names.get(a["category_id"], str(a["category_id"])))
    per_image = Counter(a["image_id"] for a in coco["annotations"])
    return {
        "classes": [names[c] for c in sorted(names)],
        "class_counts": class_counts(coco),
        "wh": np.asarray(wh, dtype=np.float64).reshape(-1, 2),
        "wh_resized": np.asarray(wh_resized, dtype=np.float64).reshape(-1, 2),
        "box_class": cls,
        "image_sizes": Counter(f"{w}x{h}" for h, w in sizes.values()),
        "boxes_per_image": np.array([per_image.get(i, 0) for i in sizes]),
        "num_images": len(sizes),
        "resize": (short, max_size),
    }


def _size_split(area):
    return int((area < SMALL).sum()), int(((area >= SMALL) & (area < MEDIUM)).sum()), int((area >= MEDIUM).sum())


def stats_tables(st):
    """Markdown tables of :func:`dataset_stats`."""
    out = [f"images: {st['num_images']}, boxes: {len(st['wh'])}, normal images: "
           f"{st['class_counts']['(normal images)'][0]} "
           f"({100.0 * st['class_counts']['(normal images)'][0] / max(st['num_images'], 1):.1f}%)", ""]
    out += ["| class | boxes | images | median w x h | median w x h resized | small/medium/large (resized) | "
            "median aspect h/w |", "|---|---|---|---|---|---|---|"]
    cls = np.array(st["box_class"])
    for n in st["classes"]:
        m = cls == n
        im, bx = st["class_counts"][n]
        if not m.any():
            out.append(f"| {n} | 0 | 0 | - | - | - | - |")
            continue
        wh, whr = st["wh"][m], st["wh_resized"][m]
        s, md, l = _size_split(whr[:, 0] * whr[:, 1])
        out.append(f"| {n} | {bx} | {im} | {np.median(wh[:, 0]):.1f} x {np.median(wh[:, 1]):.1f} | "
                   f"{np.median(whr[:, 0]):.1f} x {np.median(whr[:, 1]):.1f} | {s}/{md}/{l} | "
                   f"{np.median(wh[:, 1] / wh[:, 0]):.2f} |")
    out += ["", "| image size (w x h) | images |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in st["image_sizes"].most_common()]
    bpi = Counter(st["boxes_per_image"].tolist())
    out += ["", "| boxes per image | images |", "|---|---|"]
    out += [f"| {k} | {bpi[k]} |" for k in sorted(bpi)]
    return "\n".join(out)


def plot_stats(st, out_dir):
    """Write PNG plots to ``out_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils.fonts import plot_labels

    os.makedirs(out_dir, exist_ok=True)
    paths = []

    def save(fig, name):
        p = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(p, dpi=80)
        plt.close(fig)
        paths.append(p)

    # class names need a font that has their glyphs (CJK); without one, indices in the order of tables.md
    labels, rc, indexed = plot_labels(st["classes"])
    with matplotlib.rc_context(rc):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        counts = [st["class_counts"][n][1] for n in st["classes"]]
        ax.bar(range(len(counts)), counts)
        ax.set_xticks(range(len(counts)))
        ax.set_xticklabels(labels, rotation=45)
        ax.set_title("boxes per class (in the order of tables.md)" if indexed else "boxes per class")
        save(fig, "class_counts.png")

    for key, title in (("wh", "absolute"), ("wh_resized", "after resize")):
        wh = st[key]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        if len(wh):
            area = np.sqrt(wh[:, 0] * wh[:, 1])
            axes[0].hist(area, bins=40)
            for v, lab in ((32, "small|medium"), (96, "medium|large")):
                axes[0].axvline(v, color="r", ls="--")
                axes[0].text(v, axes[0].get_ylim()[1] * 0.9, lab, color="r", fontsize=7)
            axes[1].scatter(wh[:, 0], wh[:, 1], s=3, alpha=0.5)
        axes[0].set_xlabel("sqrt(box area) px")
        axes[1].set_xlabel("box width px")
        axes[1].set_ylabel("box height px")
        fig.suptitle(f"box sizes ({title})")
        save(fig, f"box_sizes_{'resized' if key == 'wh_resized' else 'absolute'}.png")

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    if len(st["wh"]):
        axes[0].hist(np.log2(st["wh"][:, 1] / st["wh"][:, 0]), bins=40)
    axes[0].set_xlabel("log2 aspect ratio (h/w)")
    sizes = st["image_sizes"].most_common(10)
    axes[1].barh([k for k, _ in sizes], [v for _, v in sizes])
    axes[1].set_xlabel("images")
    axes[1].set_title("image sizes (w x h)")
    bpi = st["boxes_per_image"]
    axes[2].hist(bpi, bins=np.arange(bpi.max() + 2) - 0.5 if len(bpi) else 1)
    axes[2].set_xlabel(f"boxes per image (0 = normal: {int((bpi == 0).sum())})")
    save(fig, "ratios_images_boxes.png")
    return paths
