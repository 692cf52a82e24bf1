"""Fill the on-disk caches before training (tools/cache_latents.py, tools/cache_text_encoder_outputs.py).

The files are keyed exactly as the trainer keys them (same producer strings, same seed for the
validation split), so a later training run with the same flags reuses them instead of encoding again.
"""

from __future__ import annotations

import argparse
import logging

import torch

from library.dataset.config import DatasetOptions, load_dataset_configs
from library.dataset.dataset import prefill_latent_cache, prefill_text_cache
from library.run_config import precision_dtype
from library.trainer import NetworkTrainer

logger = logging.getLogger(__name__)


def prefill(trainer: NetworkTrainer, args: argparse.Namespace, *, latents: bool, text: bool) -> None:
    options = DatasetOptions.from_args(args)
    configs = load_dataset_configs(options)
    models = trainer.load_models(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    latent_producer, text_producer = trainer.cache_producers(args)
    with torch.no_grad():
        if latents:
            dtype = torch.float32 if args.no_half_vae else precision_dtype(args.mixed_precision)
            models.vae.to(device, dtype=dtype).eval()
            sets = prefill_latent_cache(
                configs, options, lambda images: trainer.encode_images(models, images.to(device, dtype)).float().cpu(),
                latent_producer, batch_size=args.vae_batch_size, skip_check=args.skip_cache_check, seed=args.seed)
            logger.info("latents cached on disk for %d images", sum(len(s.items) for s in sets))
        if text:
            dtype = precision_dtype(args.mixed_precision)
            for encoder in models.text_encoders:
                encoder.to(device, dtype=dtype).eval()
            sets = prefill_text_cache(
                configs, options, lambda captions: {k: v.float().cpu() for k, v in trainer.encode_text(models, captions).items()},
                text_producer, batch_size=args.text_encoder_batch_size or args.vae_batch_size,
                skip_check=args.skip_cache_check, seed=args.seed)
            logger.info("text-encoder outputs cached on disk for %d images", sum(len(s.items) for s in sets))
