"""Fonts for plot text the default font cannot draw (the bottle data's Chinese class names).

matplotlib's default font (DejaVu Sans) has no CJK glyphs. matplotlib falls back glyph by glyph through the
families listed in ``rcParams["font.family"]``, so adding installed fonts that have the missing characters is
enough; when no installed font has them, plots label classes "class <i>" and list index -> name elsewhere.
"""

import functools

from matplotlib import font_manager, ft2font, rcParams

__all__ = ["font_family_for", "renders", "plot_labels"]

# matplotlib's Last Resort font maps every code point to a placeholder box: it covers nothing readable
_PLACEHOLDER_FONTS = ("Last Resort",)


@functools.lru_cache(maxsize=None)
def _charmap(path):
    try:
        return frozenset(ft2font.FT2Font(path).get_charmap())
    except (OSError, RuntimeError):
        return frozenset()


@functools.lru_cache(maxsize=None)
def _family_path(family):
    """The file matplotlib draws ``family`` (a name or a generic family such as "sans-serif") with, or None."""
    try:
        return font_manager.findfont(font_manager.FontProperties(family=[family]), fallback_to_default=False)
    except ValueError:
        return None


def _covered(family):
    out = set()
    for f in family:
        path = _family_path(f)
        if path:
            out |= _charmap(path)
    return out


def _needed(texts):
    return {ord(c) for t in texts for c in str(t) if c.isprintable() and not c.isspace()}


def renders(text, family=None):
    """Whether every character of ``text`` has a glyph in ``family`` (default: ``rcParams["font.family"]``)."""
    return _needed([text]) <= _covered(list(rcParams["font.family"]) if family is None else family)


def font_family_for(texts):
    """
    A ``font.family`` list under which every character of ``texts`` has a glyph: the current
    ``rcParams["font.family"]``, then installed fonts for the rest (each time the one covering most of it).

    Returns:
        list[str], or None when the installed fonts do not cover ``texts``.
    """
    base = list(rcParams["font.family"])
    missing = _needed(texts) - _covered(base)
    chosen = []
    # families with an upright regular face: what plot text is drawn with
    regular = {
        f.name
        for f in font_manager.fontManager.ttflist
        if f.style == "normal" and f.weight in (400, "normal")
    }
    candidates = sorted(regular - set(base))
    candidates = [c for c in candidates if not c.startswith(_PLACEHOLDER_FONTS)]
    while missing:
        gain = {c: len(missing & _charmap(p)) for c in candidates if (p := _family_path(c))}
        best = max(gain, key=gain.get, default=None)
        if best is None or gain[best] == 0:
            return None
        chosen.append(best)
        missing -= _charmap(_family_path(best))
        candidates.remove(best)
    return base + chosen


def plot_labels(names):
    """
    Labels for ``names`` (e.g. class names) in plots, and the rc settings to draw them with.

    Returns:
        labels (list[str]): ``names`` when installed fonts draw them, else ``"class <i>"`` (the caller then
            lists index -> name where it can be read, e.g. a text file);
        rc (dict): for ``matplotlib.rc_context`` (``font.family`` with the fallback fonts, or empty);
        indexed (bool): whether the labels are indices.
    """
    family = font_family_for(names)
    if family is not None:
        return list(names), {"font.family": family}, False
    return [f"class {i}" for i in range(len(names))], {}, True
