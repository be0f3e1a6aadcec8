"""Keeping the libraries quiet: their Python warnings, loggers and C++ prints never reach the terminal,
and their (often multi-line) error texts are made one line. The readers say what matters themselves."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

import numpy as np


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """Library errors (ITK especially) span many lines; the CLI prints exactly one."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "sitk::ERROR:" in text:  # drop ITK's source-file location prefix
        text = text.split("sitk::ERROR:")[-1].strip()
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


@contextlib.contextmanager
def _quiet():
    """Libraries' own warnings (Python ``warnings``, nibabel's logger) never reach the terminal: the
    readers say what matters in their own one-line errors and warnings."""
    loggers = [logging.getLogger(name) for name in ("nibabel", "pydicom")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _keep_locale():
    """GDCM resets the C library's locale to "C" while it reads some DICOM files, which turns Python's
    default text encoding into ASCII for the rest of the process (every later ``open()`` of a UTF-8
    file fails): restore the locale afterwards."""
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        if locale.setlocale(locale.LC_ALL) != saved:
            locale.setlocale(locale.LC_ALL, saved)


@contextlib.contextmanager
def _mute_native():
    """Silence file descriptors 1 and 2 while a C++ library reads: ITK's MetaIO, NRRD and GDCM code print
    their own messages ("MetaImage: M_Read: Error parsing file") with no way to switch them off.
    The C library's locale is restored afterwards (``_keep_locale``)."""
    with _keep_locale():
        yield from _mute_native_fds()


def _mute_native_fds():
    try:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        saved = (os.dup(1), os.dup(2))
    except (OSError, ValueError, AttributeError):  # no real file descriptors (embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)
