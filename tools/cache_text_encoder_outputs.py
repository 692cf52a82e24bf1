"""Encode every caption with the text encoder and store the outputs next to the images.

Takes train_network.py's flags (dataset, model, --clip_skip, --max_token_length, --text_encoder_batch_size, --seed);
a training run with the same flags and --cache_text_encoder_outputs_to_disk then reuses the files.
"""

from __future__ import annotations

from library.cache_prefill import prefill_cli
from train_network import SdNetworkTrainer, setup_parser


def main(argv: list[str] | None = None) -> None:
    prefill_cli(SdNetworkTrainer, setup_parser(), argv, latents=False, text=True)


if __name__ == "__main__":
    main()
