"""The tile grid of sliced training and sliced inference (docs/slicing.md)."""

__all__ = ["tile_grid", "tile_starts", "box_visibility"]


def tile_starts(length, tile, overlap):
    """Start offsets of the tiles along one side of ``length`` px: every ``tile - int(overlap * tile)`` px, the last
    one shifted back so that it ends at ``length``; ``[0]`` when the side is no longer than a tile."""
    step = max(1, tile - int(overlap * tile))
    starts, s = [], 0
    while s + tile < length:
        starts.append(s)
        s += step
    starts.append(max(0, length - tile))
    return starts


def tile_grid(height, width, tile_h, tile_w, overlap):
    """The tiles of an image as ``(x0, y0, x1, y1)`` px (x1, y1 exclusive), row by row; they cover every pixel."""
    return [(x, y, min(x + tile_w, width), min(y + tile_h, height))
            for y in tile_starts(height, tile_h, overlap) for x in tile_starts(width, tile_w, overlap)]


def box_visibility(box, tile):
    """The fraction of the area of ``box`` (x0, y0, x1, y1) that lies inside ``tile`` (x0, y0, x1, y1), in [0, 1];
    0 for a box of no area."""
    area = max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])
    if area <= 0:
        return 0.0
    iw = min(box[2], tile[2]) - max(box[0], tile[0])
    ih = min(box[3], tile[3]) - max(box[1], tile[1])
    return max(0.0, iw) * max(0.0, ih) / area
