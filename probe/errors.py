"""The one exception type that the CLI turns into a one-line message and exit code 2, and the switch
that keeps libraries' own log lines out of that one line."""

import logging
from contextlib import contextmanager


class ProbeError(Exception):
    """Bad input or a bad file: the message says what is wrong and how to fix it."""


@contextmanager
def library_logs_quiet():
    """Hub retries and download warnings and errors of timm, transformers, open_clip and datasets off
    while a model or data set is loaded (open_clip logs a failed download at ERROR on the root logger,
    huggingface_hub each retry): a failure becomes probe's one-line error, with the library's reason in it."""
    loggers = [logging.getLogger(), logging.getLogger("huggingface_hub"), logging.getLogger("timm"),
               logging.getLogger("datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
