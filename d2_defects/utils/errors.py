"""The project's error types and the one CLI wrapper that reports them.

A user mistake (a config value, a dataset record, a checkpoint file, a command-line flag) raises a
subclass of :class:`DefectsError` whose message names the key, file or record and the fix.
:func:`run_cli` turns exactly those into one ``ERROR: ...`` line on stderr and exit code 2; every other
exception is a bug and keeps its traceback (also written to the ``d2_defects`` log, i.e. ``log.txt``).

The subclasses also derive from the builtin type that older code caught (``ValueError``,
``RuntimeError``, ``FileNotFoundError``, ``FileExistsError``), so that ``except ValueError`` in user code
keeps working; the CLI wrapper itself never catches those builtin types.
"""
import logging
import os
import sys

__all__ = [
    "DefectsError",
    "ConfigError",
    "DatasetError",
    "CheckpointError",
    "UsageError",
    "InputNotFoundError",
    "OutputExistsError",
    "EXIT_USER_ERROR",
    "report_error",
    "run_cli",
]

EXIT_USER_ERROR = 2


class DefectsError(Exception):
    """Base of the project's user-facing errors (reported as one ``ERROR:`` line, exit code 2)."""


class ConfigError(DefectsError, ValueError):
    """A config key has a value the project cannot use; the message names the key (shown as ``config error: ...``)."""

    def __str__(self):
        msg = str(self.args[0]) if self.args else ""
        return msg if msg.startswith("config error") else f"config error: {msg}"


class DatasetError(DefectsError, ValueError):
    """
    A dataset failed validation. ``problems`` holds one message per bad record.

    ``DatasetError(source, problems)`` lists the problems under ``source`` (file or dataset name);
    ``DatasetError(message)`` is a single problem.
    """

    def __init__(self, source, problems=None, max_shown=20):
        self.source = source
        if problems is None:
            self.problems = []
            super().__init__(str(source))
            return
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:max_shown])
        more = len(self.problems) - max_shown
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{source}: {len(self.problems)} problem(s) found:\n  {shown}{tail}")

    def __reduce__(self):  # picklable across processes (DataLoader workers, launch)
        return (_rebuild_dataset_error, (self.args[0], self.source, self.problems))


def _rebuild_dataset_error(message, source, problems):
    e = DatasetError(message)
    e.source, e.problems = source, problems
    return e


class CheckpointError(DefectsError, RuntimeError):
    """A checkpoint file is missing, truncated, unsafe or made for another model. The message names the file."""


class UsageError(DefectsError, ValueError):
    """A command-line argument or combination of arguments that cannot work."""


class InputNotFoundError(DefectsError, FileNotFoundError):
    """An input file or folder named by the user does not exist."""

    def __str__(self):
        return str(self.args[0]) if self.args else "file not found"


class OutputExistsError(DefectsError, FileExistsError):
    """An output would replace existing results; the message names it and the flag that allows it."""

    def __str__(self):
        return str(self.args[0]) if self.args else "output exists"


def report_error(e, stream=None):
    """Print a :class:`DefectsError` as one ``ERROR: ...`` line (a DatasetError lists its records below)."""
    print(f"ERROR: {e}", file=stream or sys.stderr, flush=True)
    try:
        logging.getLogger("d2_defects").debug(f"ERROR: {e}")
    except Exception:  # a closed log stream must not hide the message above
        pass
    return EXIT_USER_ERROR


def _in_process_group():
    try:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    except Exception:
        return False


def run_cli(fn, *args, distributed=None, exit=True, **kwargs):
    """
    Call ``fn(*args, **kwargs)`` and return its result. A :class:`DefectsError` is printed as one
    ``ERROR: ...`` line and ends the process with exit code 2 (``os._exit`` when ``distributed``, so that
    other ranks waiting in a collective are stopped by the launcher; None: when a process group of more
    than one process is running). Any other exception is logged with
    its traceback to the ``d2_defects`` logger (``log.txt``) and re-raised unchanged.

    With ``exit=False`` the exit code 2 is returned instead of ending the process (tools' ``main`` functions
    return their exit code).
    """
    try:
        return fn(*args, **kwargs)
    except DefectsError as e:
        report_error(e)
        if not exit:
            return EXIT_USER_ERROR
        if distributed is None:
            distributed = _in_process_group()
        if distributed:
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(EXIT_USER_ERROR)
        sys.exit(EXIT_USER_ERROR)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        logger = logging.getLogger("d2_defects")
        if logger.handlers:  # set up by the run: put the traceback into log.txt as well
            try:
                logger.exception("unexpected error (a bug, not a problem of the input); traceback:")
            except Exception:
                pass
        raise
