"""Keeping the exporters quiet: their prints, warnings, log records and native messages, and their long errors."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator

import torch

from surgery.core.util import first_line


@contextlib.contextmanager
def _native_output_to_null() -> Iterator[None]:
    """Point file descriptors 1 and 2 at the null device for the duration: native code writes there directly."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # pragma: no cover - no standard descriptors to silence
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)
        os.close(null)


@contextlib.contextmanager
def quiet(verbose: bool) -> Iterator[None]:
    """Silence the exporters' prints, warnings, log records and native messages (unless ``verbose``)."""
    if verbose:
        yield
        return
    onnx_log = torch._C._jit_is_onnx_log_enabled()  # the TorchScript exporter turns its log on and leaves it on
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            with _native_output_to_null():
                yield
        finally:
            logging.disable(previous)
            torch._C._jit_set_onnx_log_enabled(onnx_log)


def reason(error: BaseException) -> str:
    """The informative line of an exporter error: the innermost cause's first line, ANSI colours removed."""
    while error.__cause__ is not None:
        error = error.__cause__
    return re.sub(r"\x1b\[[0-9;]*m", "", first_line(error)).strip()
