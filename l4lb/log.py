"""Structured logging: structlog, JSON lines on stderr (or a console renderer for people).

Events are past-tense snake_case facts with fields (`backend_state_changed`), never
formatted sentences. The data path logs per connection at most (the access line), never
per chunk: one emitted JSON line costs about as much as a whole echo round trip.
"""
import logging
import sys

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
          "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(level: str = "info", fmt: str = "json", stream=None) -> None:
    """Set up structlog for the whole process. Idempotent; safe to call on reload."""
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound):
    return structlog.get_logger("l4lb").bind(**bound) if bound else structlog.get_logger("l4lb")
