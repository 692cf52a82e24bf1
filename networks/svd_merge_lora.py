"""sd-scripts' networks/svd_merge_lora.py: merge LoRAs into one at a fixed rank by truncated SVD.

The same tool as networks/merge_lora.py with --new_rank defaulting to 4, as sd-scripts' script has it; see
there for the flags. (sd-scripts' --lbws per-block ratios are not supported.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from networks import merge_lora

DEFAULT_NEW_RANK = 4


def setup_parser() -> argparse.ArgumentParser:
    return merge_lora.setup_parser(prog="svd_merge_lora.py", default_new_rank=DEFAULT_NEW_RANK)


def main(argv: list[str] | None = None) -> None:
    merge_lora.main(argv, setup_parser())


if __name__ == "__main__":
    main()
