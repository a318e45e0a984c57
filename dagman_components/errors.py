# Copyright (c) DAGMaN components contributors.
# Licensed under the Apache License, Version 2.0.
"""Errors a person reads in one glance: a short report instead of a traceback for known errors.

A bundle config calls :func:`install_excepthook` as the first item of its ``initialize`` list. From then
on an uncaught *known* error ends the process (exit status 1) with one short block on stderr: what
is wrong, which file or config key, what to do, and which config expression was being evaluated.
Known errors are the project's own errors (subclasses of :class:`DagmanError`: :class:`ConfigValueError`,
``DataSourceError``, ``WeightLoadError``, ...), ``ValueError`` / ``OSError`` / ``RuntimeError`` raised by
``dagman_components`` code, missing, unreadable or unwritable files, a full disk, and torch's
``Error(s) in loading state_dict``, which is summarised as counts and the first few keys instead
of hundreds of lines. Any other error keeps
Python's usual traceback.

The full traceback is never lost: it is written to a file in the temporary folder named in the
block, and setting the environment variable ``DAGMAN_DEBUG=1`` prints it as usual instead.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Iterator
from types import TracebackType
from typing import Any

__all__ = [
    "DEBUG_ENV",
    "DagmanError",
    "ConfigValueError",
    "shorten_log_record",
    "find_known_error",
    "format_error_block",
    "is_state_dict_error",
    "install_excepthook",
    "summarise_state_dict_error",
]

#: Environment variable that restores Python's full traceback for every error.
DEBUG_ENV = "DAGMAN_DEBUG"
#: Most lines of an error's own message shown in the block.
MAX_MESSAGE_LINES = 8
#: Keys named when summarising a state-dict mismatch.
SHOWN_KEYS = 5

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_FILE_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_STATE_DICT_ERROR = "Error(s) in loading state_dict for"
_CONFIG_WRAPPERS = ("Failed to evaluate ConfigExpression", "Failed to instantiate component")
_previous_hook = None
_previous_factory = logging.getLogRecordFactory()


class DagmanError(Exception):
    """The base of every error this project raises on purpose (bad input, a setting that cannot be used).

    Each package defines its own subclass beside the code that raises it (``DataSourceError`` in
    ``data``, ``WeightLoadError`` in ``weights``, ``NoduleTableError`` in ``classification``, ...),
    usually also deriving from the built-in error it stands for (``ValueError``, ``RuntimeError``).
    :func:`install_excepthook` reports any ``DagmanError`` as a short block; no list of names is kept here.
    """


class ConfigValueError(DagmanError, ValueError):
    """A bundle setting cannot be used; the message names the config key and the values it accepts."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and its causes / contexts, outermost first (each once)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _raised_by_us(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is in ``dagman_components``."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep)


def _is_known(exc: BaseException) -> bool:
    if isinstance(exc, DagmanError):
        return True
    if isinstance(exc, OSError) and exc.errno in _FILE_ERRNOS:
        return True
    if is_state_dict_error(exc) or is_pickled_objects_refusal(exc):
        return True
    return isinstance(exc, (ValueError, OSError, RuntimeError)) and _raised_by_us(exc)


def is_pickled_objects_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is ``torch.load(weights_only=True)`` refusing a file with pickled objects (ours or MONAI's
    own loaders)."""
    return "Weights only load failed" in str(exc)


def pickled_objects_message(path: str | os.PathLike, what: str = "weights") -> str:
    """Our words for a file that holds pickled Python objects (torch's own text suggests ``weights_only=False``,
    which would run code from the file).

    Args:
        path: the file.
        what: what the file was read as, opening the message ("weights", "model weights", "the").

    Returns:
        The message.
    """
    return (
        f"{what} file '{path}' holds pickled Python objects, not only tensors, and will not be loaded: "
        "unpickling could run code from the file. Save the tensors only (a state_dict) and load that."
    )


def find_known_error(exc: BaseException) -> BaseException | None:
    """The outermost known error in ``exc``'s chain (``exc`` itself included), or None.

    A config expression that fails is re-raised by MONAI as ``RuntimeError("Failed to evaluate ...")``
    from the original error, which is the one worth showing; where our code re-raises a known error
    with more context (the config key, the file), the outer one is shown.
    """
    return next((e for e in _chain(exc) if _is_known(e)), None)


def is_state_dict_error(exc: BaseException) -> bool:
    """Whether ``exc`` is torch's ``RuntimeError`` from a strict ``load_state_dict`` that did not fit."""
    return isinstance(exc, RuntimeError) and str(exc).startswith(_STATE_DICT_ERROR)


def summarise_state_dict_error(message: str, shown: int = SHOWN_KEYS, advice: bool = True) -> str:
    """Shorten torch's ``Error(s) in loading state_dict for X`` text to counts and the first keys.

    Args:
        message: the text of torch's ``RuntimeError`` from ``load_state_dict``.
        shown: how many keys to name per kind of problem.
        advice: end with what to do (build the network with the settings of the weights' model card).

    Returns:
        A few lines: the network class, the number of shape mismatches, missing and unexpected
        keys with the first ``shown`` of each, and (with ``advice``) what to do.
    """
    network = message[len(_STATE_DICT_ERROR) :].split(":", 1)[0].strip() or "the network"
    mismatched = re.findall(r"size mismatch for ([^:\s]+):", message)
    missing = _listed_keys(message, "Missing key(s) in state_dict:")
    unexpected = _listed_keys(message, "Unexpected key(s) in state_dict:")
    lines = [f"the weights do not fit {network}:"]
    for what, keys in (("tensors of another shape", mismatched), ("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
            lines.append(f"  {len(keys)} {what}: {', '.join(keys[:shown])}{more}")
    if advice:
        lines.append("They were saved from a network with other settings: build the network with the settings of the "
                     "weights' model card (models/model_card.json: embed_dim, depths, num_heads, ...), or pick the "
                     "weights that match this config.")
    return "\n".join(lines)


def _listed_keys(message: str, header: str) -> list[str]:
    start = message.find(header)
    if start < 0:
        return []
    line = message[start + len(header) :].split("\n", 1)[0]
    return re.findall(r'"([^"]+)"', line)


def _loaded_file(exc: BaseException) -> str | None:
    """The file being loaded when ``exc`` was raised: a ``load_path`` (MONAI's ``CheckpointLoader``) or
    ``path`` found in the traceback's frames, innermost first; None when there is none."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        owner = frame.f_locals.get("self")
        for candidate in (getattr(owner, "load_path", None), frame.f_locals.get("load_path"), frame.f_locals.get("path")):
            if isinstance(candidate, (str, os.PathLike)) and os.path.isfile(candidate):
                return os.fspath(candidate)
    return None


def _config_context(exc: BaseException, known: BaseException) -> str | None:
    """The config expression or component MONAI was evaluating when ``known`` was raised (innermost)."""
    context = None
    for e in _chain(exc):
        if e is known:
            break
        text = str(e)
        if isinstance(e, RuntimeError) and text.startswith(_CONFIG_WRAPPERS):
            context = text
    if context is None:
        return None
    body = " ".join(line.strip() for line in context.splitlines()[1:] if line.strip()) or context.splitlines()[0]
    body = re.sub(r"__local_refs\['([^']+)'\]", lambda m: "@" + m.group(1).replace("::", "#"),  # MONAI's names
                  body.strip('"'))
    return body if len(body) <= 160 else body[:157] + "..."


def _message(known: BaseException) -> str:
    text = str(known).strip()
    if is_pickled_objects_refusal(known):  # torch's text suggests weights_only=False, which would run the file's code
        return pickled_objects_message(_loaded_file(known) or "(unknown)", what="the")
    if is_state_dict_error(known):
        summary = summarise_state_dict_error(text)
        path = _loaded_file(known)
        return summary.replace("the weights do not", f"the weights '{path}' do not", 1) if path else summary
    if isinstance(known, OSError) and known.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return f"{text}\nThe disk is full (or a file-size limit was hit): free space or choose another bundle_root."
    if isinstance(known, OSError) and known.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{text}\nNo permission: make the file readable (or the folder writable), or choose another path."
    if isinstance(known, FileNotFoundError) and not _raised_by_us(known):
        return f"{text}\nCheck the path (config key or command-line option that names it)."
    return text or type(known).__name__


def format_error_block(exc: BaseException, traceback_file: str | None = None) -> str | None:
    """The short report of a known error in ``exc``'s chain, or None when the chain holds none.

    Args:
        exc: the uncaught exception.
        traceback_file: where the full traceback was written, named in the last line.

    Returns:
        At most about a dozen lines: the error's type and message (first lines only), the config
        expression being evaluated, and where the full traceback is.
    """
    known = find_known_error(exc)
    if known is None:
        return None
    lines = _message(known).splitlines()
    if len(lines) > MAX_MESSAGE_LINES:
        lines = lines[:MAX_MESSAGE_LINES] + [f"  ... ({len(lines) - MAX_MESSAGE_LINES} more lines in the full traceback)"]
    block = [f"ERROR ({type(known).__name__}): {lines[0]}", *lines[1:]]
    context = _config_context(exc, known)
    if context:
        block.append(f"While evaluating the config: {context}")
    where = f"written to {traceback_file}; " if traceback_file else ""
    block.append(f"Full traceback: {where}set {DEBUG_ENV}=1 to print it.")
    return "\n".join(block)


def _write_traceback(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> str | None:
    path = os.path.join(tempfile.gettempdir(), f"dagman_traceback_{os.getpid()}.txt")
    try:
        with open(path, "w", encoding="utf-8") as stream:
            stream.write("".join(traceback.format_exception(exc_type, exc, tb)))
    except OSError:
        return None
    return path


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    fallback = _previous_hook or sys.__excepthook__
    if _debug() or not isinstance(exc, Exception):
        fallback(exc_type, exc, tb)
        return
    try:
        known = find_known_error(exc)
        block = format_error_block(exc, _write_traceback(exc_type, exc, tb)) if known is not None else None
    except Exception:  # never hide the original error behind a failure of the report
        block = None
    if block is None:
        fallback(exc_type, exc, tb)
        return
    sys.stderr.write(block + "\n")
    sys.stderr.flush()


def shorten_log_record(record: logging.LogRecord) -> logging.LogRecord:
    """Keep a log record of a known error short, as the final block is, and return it.

    Ignite and MONAI's handlers log an exception before it reaches the top (``Engine run is terminating
    due to exception``, ``Exception: ...`` with the traceback), which repeats torch's full list of
    state-dict mismatches several times. Here that list becomes :func:`summarise_state_dict_error`,
    and the traceback of a known error is dropped from the record (it is in the file named at exit).
    With ``DAGMAN_DEBUG`` set, records are left unchanged.
    """
    if _debug():
        return record
    try:
        message = record.getMessage()
        at = message.find(_STATE_DICT_ERROR)
        shortened = message[:at] + summarise_state_dict_error(message[at:]) if at >= 0 else message
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and find_known_error(exc) is not None:
            record.exc_info, record.exc_text = None, None
            lines = shortened.splitlines()
            if len(lines) > MAX_MESSAGE_LINES:
                shortened = "\n".join(lines[:MAX_MESSAGE_LINES] + ["  ..."])
        if shortened != message:
            record.msg, record.args = shortened, ()
    except Exception:  # a log record is never lost to the shortening
        pass
    return record


def _short_record_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    return shorten_log_record(_previous_factory(*args, **kwargs))


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def install_excepthook() -> bool:
    """Make uncaught known errors end with the short block of :func:`format_error_block`.

    Called first in each bundle config's ``initialize``; calling it again changes nothing. Other
    errors, and every error while ``DAGMAN_DEBUG`` is set (to anything but ``0``), keep the hook that
    was installed before (Python's traceback). Log records are shortened by :func:`shorten_log_record`,
    through the log-record factory, so that loggers created later (Ignite's, MONAI's handlers') are
    covered too.

    Returns:
        True, so that a config expression evaluates to a value.
    """
    global _previous_hook, _previous_factory
    if sys.excepthook is not _excepthook:
        _previous_hook = sys.excepthook
        sys.excepthook = _excepthook
    if logging.getLogRecordFactory() is not _short_record_factory:
        _previous_factory = logging.getLogRecordFactory()
        logging.setLogRecordFactory(_short_record_factory)
    return True
