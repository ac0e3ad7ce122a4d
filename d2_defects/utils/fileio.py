"""Writing files so that a reader (or a run killed mid-write) never sees a partial one."""
import json
import os
import threading

from .errors import OutputExistsError, UsageError

__all__ = ["atomic_write", "atomic_write_json", "atomic_write_text", "check_can_write"]


def atomic_write(path, write_fn, mode="wb"):
    """
    Call ``write_fn(f)`` on a temporary file next to ``path``, fsync it and rename it to ``path``
    (``os.replace``: atomic on POSIX and Windows). A crash leaves the old file (or none), never a truncated one;
    the temporary file is removed if ``write_fn`` raises. Threads and processes may write different files at
    once (the temporary name holds the pid and thread id).
    """
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text):
    """Write a string to ``path`` atomically (UTF-8)."""
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path, obj, **dump_kwargs):
    """Write ``obj`` as JSON to ``path`` atomically (``dump_kwargs`` go to ``json.dump``)."""
    atomic_write(path, lambda f: json.dump(obj, f, **dump_kwargs), mode="w")


def check_can_write(paths, overwrite, protected=()):
    """
    The overwrite guard of every tool: raise :class:`OutputExistsError` naming the first of ``paths`` that exists
    (a file, or a folder that is not empty) unless ``overwrite``; and a :class:`UsageError` for a path that is one
    of ``protected`` (the tool's input files), even with ``overwrite``.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for path in paths:
        real = os.path.realpath(path)
        for p in protected:
            if p and os.path.realpath(p) == real:
                raise UsageError(f"refusing to write over the input {path}; choose another output")
        if not overwrite and os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise OutputExistsError(f"{path} exists (use --overwrite to replace it)")
