"""Console logging for the entry scripts (set up in main(), never at import)."""

from __future__ import annotations

import argparse
import logging


def setup_logging(args: argparse.Namespace) -> None:
    """--console_log_level / --console_log_file / --console_log_simple, as sd-scripts."""
    level = getattr(logging, args.console_log_level or "INFO")
    fmt = "%(message)s" if args.console_log_simple else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if args.console_log_file:
        handlers = [logging.FileHandler(args.console_log_file, encoding="utf-8")]
    logging.basicConfig(level=level, format=fmt, handlers=handlers, force=True)
