"""Writing files so that a reader (or a run killed mid-write) never sees a partial one."""
import json
import os
import threading

__all__ = ["atomic_write", "atomic_write_json", "atomic_write_text"]


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
