"""Log lines a replica writes about requests: one line for a refused request, tracebacks only
for faults.

Serve logs every exception a replica method raises as ``Request failed.`` with its traceback,
at ERROR: a client that sends a bad picture would fill the log with thirty-line tracebacks of
the service's own refusals. Our typed errors are answers, not faults: the filter turns such a
record into one line naming the error code, kept in Serve's structured log with its request
id and route. Any other exception keeps its traceback.
"""
from __future__ import annotations

import logging

from serve_app.deployments.failures import typed_error
from serve_app.errors import RestoreError

SERVE_LOGGER = "ray.serve"


class _TypedErrorsInOneLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = typed_error(record.exc_info[1])
            if isinstance(error, RestoreError):
                record.msg, record.args = "%s: %d %s: %s", (record.getMessage().rstrip("."), error.status,
                                                            error.code, error.detail)
                record.exc_info, record.exc_text, record.stack_info = None, None, None
                record.levelno = logging.INFO if error.status < 500 else logging.WARNING
                record.levelname = logging.getLevelName(record.levelno)
        return True


_FILTER = _TypedErrorsInOneLine()


def quiet_client_errors() -> None:
    """Install the filter on Serve's logger in this process (once; call it from each replica)."""
    logger = logging.getLogger(SERVE_LOGGER)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
