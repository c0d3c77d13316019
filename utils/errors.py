"""The deliberate error types of bad input. ``run_cli`` prints these as one ``error: ...`` line
and exits with code 2; so it does a full disk (``is_disk_full``, code 1) and a training run stopped
by a signal after saving its checkpoint (``Interrupted``, code ``EXIT_INTERRUPTED``); any other
exception is a bug and keeps its traceback."""

import errno
import re

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})  # no space, a file-size limit (ulimit -f), a quota
# How writers that do not raise OSError say the same: safetensors (Rust), torch.save (PyTorchStreamWriter).
_DISK_FULL_TEXT = re.compile(r"os error (?:%s)\b|No space left on device|File too large|Disk quota exceeded|file write failed|unexpected pos \d+ vs \d+"
                             % "|".join(str(e) for e in sorted(DISK_FULL_ERRNOS)))


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a write refused for want of space, by a file-size
    limit or by a quota."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if (isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS) or _DISK_FULL_TEXT.search(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


class UsageError(ValueError):
    """A value the user gave (a flag, a file, a config entry) is not what was expected."""


class MissingInput(UsageError, FileNotFoundError):
    """Something the user pointed at does not exist where they said."""


class OutputConflict(UsageError, FileExistsError):
    """An output location already holds something this run must not overwrite."""


EXIT_INTERRUPTED = 75  # sysexits' EX_TEMPFAIL: stopped on request, checkpoint saved; the same command resumes


class Interrupted(Exception):
    """A training run stopped by SIGTERM or SIGUSR1 after saving a checkpoint (``utils.preemption``)."""
