"""Splitting a COCO dict into train/val (random, stratified, interval, k-fold), deterministically."""
from collections import Counter

import numpy as np
from ..utils.errors import UsageError

__all__ = ["SPLIT_METHODS", "split_images", "kfold_images", "subset_coco", "class_counts", "counts_table"]

SPLIT_METHODS = ("random", "stratified", "interval", "kfold")


def _cut(ids, fractions):
    """Split a list by fractions (largest remainder, so the sizes add up)."""
    n = len(ids)
    bounds = np.round(np.cumsum([0.0] + list(fractions)) / sum(fractions) * n).astype(int)
    return [list(ids[bounds[i]:bounds[i + 1]]) for i in range(len(fractions))]


def _strata(coco):
    """Image id -> its rarest class (by box count over the dataset), or None for normal images."""
    freq = Counter(a["category_id"] for a in coco["annotations"])
    classes = {}
    for a in coco["annotations"]:
        classes.setdefault(a["image_id"], set()).add(a["category_id"])
    return {img["id"]: min(classes[img["id"]], key=lambda c: (freq[c], c)) if img["id"] in classes else None
            for img in coco["images"]}


def split_images(coco, method="random", fractions=(0.9, 0.1), seed=0, every=None):
    """
    Split the image ids of ``coco``.

    Args:
        method (str): "random" (shuffled with ``seed``), "stratified" (each image counted under its
            rarest class, normal images as their own group; each group split by ``fractions``) or
            "interval" (file order; every ``every``-th image goes to the last split, so near-duplicate
            neighbouring frames do not leak; ``every`` defaults to round(1 / fractions[-1])).
        fractions (tuple[float]): relative split sizes.

    Returns:
        list[list[int]]: image ids per split (disjoint, covering every image).
    """
    ids = [img["id"] for img in coco["images"]]
    rng = np.random.RandomState(seed)
    if method == "random":
        perm = [ids[i] for i in rng.permutation(len(ids))]
        return _cut(perm, fractions)
    if method == "stratified":
        strata = _strata(coco)
        out = [[] for _ in fractions]
        groups = {}
        for i in ids:
            groups.setdefault(strata[i], []).append(i)
        for key in sorted(groups, key=lambda k: (k is None, str(k))):
            g = groups[key]
            perm = [g[i] for i in rng.permutation(len(g))]
            for part, chunk in zip(out, _cut(perm, fractions)):
                part.extend(chunk)
        return out
    if method == "interval":
        if len(fractions) != 2:
            raise UsageError("interval split makes two splits; give two fractions")
        k = int(every or round(1.0 / fractions[-1]))
        if k < 2:
            raise UsageError(f"interval split needs every >= 2, got {k}")
        order = [img["id"] for img in sorted(coco["images"], key=lambda im: im["file_name"])]
        return [[i for j, i in enumerate(order) if j % k != k - 1], [i for j, i in enumerate(order) if j % k == k - 1]]
    raise UsageError(f"unknown split method {method!r}; use one of {SPLIT_METHODS}")


def kfold_images(coco, k=5, seed=0, stratified=True):
    """
    Returns:
        list[list[int]]: k disjoint folds of image ids (stratified by rarest class unless told not to).
    """
    if k < 2:
        raise UsageError(f"k-fold needs k >= 2, got {k}")
    parts = split_images(coco, "stratified" if stratified else "random", fractions=[1.0] * k, seed=seed)
    return parts


def subset_coco(coco, image_ids):
    """The COCO dict restricted to ``image_ids`` (categories kept, so every split has the same ids)."""
    keep = set(image_ids)
    out = {k: v for k, v in coco.items() if k not in ("images", "annotations")}
    out["images"] = [img for img in coco["images"] if img["id"] in keep]
    out["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    return out


def class_counts(coco):
    """dict: class name -> (images, boxes); plus "(normal images)" -> (count, 0)."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    boxes = Counter(a["category_id"] for a in coco["annotations"])
    imgs = Counter(c for c, _ in {(a["category_id"], a["image_id"]) for a in coco["annotations"]})
    out = {names[c]: (imgs.get(c, 0), boxes.get(c, 0)) for c in sorted(names)}
    with_boxes = {a["image_id"] for a in coco["annotations"]}
    out["(normal images)"] = (sum(img["id"] not in with_boxes for img in coco["images"]), 0)
    return out


def counts_table(splits):
    """Markdown table of per-class box (and image) counts per split. ``splits``: {name: coco}."""
    counts = {s: class_counts(c) for s, c in splits.items()}
    names = list(next(iter(counts.values())))
    head = "| class | " + " | ".join(f"{s} boxes (images)" for s in splits) + " |"
    lines = [head, "|---" * (len(splits) + 1) + "|"]
    for n in names:
        cells = []
        for s in splits:
            im, bx = counts[s][n]
            cells.append(f"{im}" if n == "(normal images)" else f"{bx} ({im})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("| images | " + " | ".join(str(len(c["images"])) for c in splits.values()) + " |")
    return "\n".join(lines)
