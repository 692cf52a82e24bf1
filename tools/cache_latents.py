"""Encode every dataset image with the VAE and store the latents next to the images.

Takes train_network.py's flags (dataset, model, --mixed_precision, --no_half_vae, --vae_batch_size, --seed);
a training run with the same flags and --cache_latents_to_disk then reuses the files.
"""

from __future__ import annotations

from library.cache_prefill import prefill_cli
from train_network import SdNetworkTrainer, setup_parser


def main(argv: list[str] | None = None) -> None:
    prefill_cli(SdNetworkTrainer, setup_parser(), argv, latents=True, text=False)


if __name__ == "__main__":
    main()
