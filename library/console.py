"""Console logging for the entry scripts (set up in main(), never at import)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


def setup_logging(args: argparse.Namespace) -> None:
    """--console_log_level / --console_log_file / --console_log_simple, as sd-scripts."""
    level = getattr(logging, args.console_log_level or "INFO")
    fmt = "%(message)s" if args.console_log_simple else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if args.console_log_file:
        handlers = [logging.FileHandler(args.console_log_file, encoding="utf-8")]
    logging.basicConfig(level=level, format=fmt, handlers=handlers, force=True)


def exit_on_user_error(run: Callable[[], T], errors: tuple[type[BaseException], ...]) -> T:
    """Run the script; an expected problem (bad file, flag, dataset, diverged loss) ends it with one line.

    The traceback is still logged at DEBUG level (--console_log_level DEBUG) for bug reports.
    """
    try:
        return run()
    except errors as error:
        logging.getLogger(__name__).debug("traceback", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
