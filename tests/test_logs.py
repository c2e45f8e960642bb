"""Refused requests log one line; faults keep their tracebacks."""
import logging

from ray.exceptions import RayTaskError

from serve_app.deployments.logs import SERVE_LOGGER, quiet_client_errors
from serve_app.errors import InvalidOption


def _record(exc: BaseException) -> logging.LogRecord:
    caught = []

    class Keep(logging.Handler):
        def emit(self, record):
            caught.append((record, self.format(record)))

    logger = logging.getLogger(SERVE_LOGGER)
    handler = Keep()
    logger.addHandler(handler)
    try:
        try:
            raise exc
        except Exception:
            logger.exception("Request failed.")
    finally:
        logger.removeHandler(handler)
    return caught[0]


def test_a_typed_error_is_one_info_line_with_its_code_and_a_fault_keeps_its_traceback():
    quiet_client_errors()
    quiet_client_errors()  # idempotent: one filter
    assert len(logging.getLogger(SERVE_LOGGER).filters) == 1
    wrapped = RayTaskError("restore_bytes", "traceback", InvalidOption("scale: must be > 0")).as_instanceof_cause()
    record, line = _record(wrapped)
    assert record.levelno == logging.INFO and "\n" not in line
    assert line == "Request failed: 400 invalid_option: scale: must be > 0"
    record, line = _record(KeyError("x"))
    assert record.levelno == logging.ERROR and "Traceback" in line
