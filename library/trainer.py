"""NetworkTrainer: the one LoRA training loop every model family shares.

Read `train()` top to bottom: flags → dataset → models → caches → network → optimizer → loop → files.
A family (SD1/2, SDXL, SD3) subclasses NetworkTrainer and overrides only the hooks in the first
section below; everything else is shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list
from tqdm import tqdm

from library.dataset.cache import latent_cache_conflicts, text_cache_conflicts
from library.dataset.config import DatasetOptions, load_dataset_configs
from library.dataset.dataset import TrainDataset, split_validation
from library.lr_schedulers import SchedulerConfig, build_lr_scheduler
from library.optim import OptimizerConfig, build_optimizer, set_train_mode
from library.run_config import RunConfig, SaveConfig, SampleConfig, precision_dtype
from library.metadata import minimum_metadata
from library.saving import (epoch_file_name, epoch_pattern, epoch_state_name, last_state_name, rotate, step_file_name,
                            step_pattern, step_state_name, steps_keep_count)
from library.train_state import TrainState, resolve_resume_folder, save_state_folder

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stops before a broken LoRA is written."""


@dataclass
class Models:
    """What a family's `load_models` returns. `denoiser` is the U-Net or MMDiT."""

    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    extra: dict[str, Any] = field(default_factory=dict)


class NetworkTrainer:
    # ------------------------------------------------------------------ family hooks
    def check_model_files(self, args: argparse.Namespace) -> None:
        """Cheap checks of the model files (exist, right family) before the dataset is scanned."""
        raise NotImplementedError

    def load_models(self, args: argparse.Namespace) -> Models:
        raise NotImplementedError

    def encode_images(self, models: Models, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → scaled latents."""
        raise NotImplementedError

    def encode_text(self, models: Models, captions: list[str]) -> dict[str, torch.Tensor]:
        """Captions → the conditioning tensors the denoiser takes (batched along dim 0)."""
        raise NotImplementedError

    def cache_producers(self, args: argparse.Namespace) -> tuple[str, str]:
        """Strings naming what produces latents and text outputs; a cache made by anything else is stale."""
        raise NotImplementedError

    def compute_loss(self, models: Models, batch: dict, latents: torch.Tensor, text: dict[str, torch.Tensor],
                     generator: torch.Generator | None) -> torch.Tensor:
        """Noise, timesteps, model call and loss for one batch; returns the per-sample loss (B,)."""
        raise NotImplementedError

    def sample_images(self, models: Models, sample: SampleConfig, *, step: int, epoch: int | None,
                      device: torch.device) -> list[Path]:
        raise NotImplementedError

    def model_metadata(self, args: argparse.Namespace, models: Models) -> dict[str, str]:
        """ss_base_model_version, modelspec.* and the family's own ss_* keys."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the loop
    def train(self, args: argparse.Namespace) -> Path | None:
        resumed = TrainState.read(resolve_resume_folder(args.resume)) if args.resume else None
        run = RunConfig.from_args(args, resumed_seed=resumed.seed if resumed else None)
        log_flag_notes(args)
        check_input_files(args)
        self.check_model_files(args)
        accelerator = self._make_accelerator(args, run)
        if accelerator.num_processes > 1:  # a seed drawn at random must be the same on every process
            run = dataclasses.replace(run, seed=broadcast_object_list([run.seed])[0])
        set_seed(run.seed, accelerator.process_index)

        dataset_options = DatasetOptions.from_args(args)
        train_set, val_set = split_validation(load_dataset_configs(dataset_options), dataset_options, seed=run.seed)
        self._check_cache_conflicts(args, train_set)
        self._report_dataset(train_set, run)
        if args.debug_dataset:
            show_dataset(train_set)
            return None

        models = self.load_models(args)
        weight_dtype, vae_dtype = precision_dtype(run.mixed_precision), torch.float32 if args.no_half_vae else precision_dtype(run.mixed_precision)
        device = accelerator.device
        self._freeze(models)
        latent_producer, text_producer = self.cache_producers(args)
        self._cache_latents(args, models, train_set, val_set, latent_producer, device, vae_dtype, accelerator)
        train_text_encoder = not args.network_train_unet_only and not args.cache_text_encoder_outputs

        network = self._create_network(args, models, train_text_encoder, accelerator)
        if args.cache_text_encoder_outputs:
            self._cache_text(args, models, train_set, val_set, text_producer, device, weight_dtype, accelerator)

        models.denoiser.to(device, dtype=weight_dtype)
        for encoder in models.text_encoders:
            if not args.cache_text_encoder_outputs:
                encoder.to(device, dtype=weight_dtype)
        if args.gradient_checkpointing:
            models.denoiser.set_gradient_checkpointing(True, cpu_offload=args.cpu_offload_checkpointing)
            if train_text_encoder:
                for encoder in models.text_encoders:
                    encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        models.denoiser.train(args.gradient_checkpointing)
        for encoder in models.text_encoders:
            encoder.train(train_text_encoder and args.gradient_checkpointing)
        if run.full_precision_lora:
            network.to(weight_dtype)

        text_lr = args.text_encoder_lr if args.text_encoder_lr else None
        params, lr_names = network.prepare_optimizer_params(text_lr, args.unet_lr, args.learning_rate)
        optimizer_name, optimizer = build_optimizer(OptimizerConfig.from_args(args), params)
        loader = torch.utils.data.DataLoader(train_set, batch_size=1, shuffle=False, collate_fn=_first,
                                             num_workers=args.max_data_loader_n_workers,
                                             persistent_workers=args.persistent_data_loader_workers and args.max_data_loader_n_workers > 0)
        steps_per_epoch = math.ceil(len(loader) / accelerator.num_processes / run.gradient_accumulation_steps)
        max_steps, max_epochs = run.total_steps(steps_per_epoch)
        scheduler = build_lr_scheduler(SchedulerConfig.from_args(args), optimizer, num_training_steps=max_steps,
                                       num_processes=accelerator.num_processes)
        network, optimizer, loader, scheduler = accelerator.prepare(network, optimizer, loader, scheduler)

        state = initial_state(args, steps_per_epoch, run.seed)
        skip_data = args.skip_until_initial_step or bool(args.resume)
        for _ in range(state.global_step):
            scheduler.step()  # the schedule continues where --initial_step says the run stands
        if resumed is not None:
            accelerator.load_state(str(resolve_resume_folder(args.resume)))
            state = resumed
            logger.info("resumed from %s at epoch %d, step %d", args.resume, state.epoch, state.global_step)

        metadata = self._metadata(args, models, train_set, optimizer_name, max_steps, run)
        save = SaveConfig.from_args(args, max_epochs)
        sample = SampleConfig.from_args(args)
        self._init_trackers(accelerator, args)
        logger.info("steps per epoch %d, epochs %d, total optimizer steps %d, optimizer %s", steps_per_epoch, max_epochs,
                    max_steps, optimizer_name)

        context = _LoopContext(accelerator, models, network, optimizer, scheduler, loader, train_set, val_set, save, sample,
                               metadata, lr_names, run, max_steps, max_epochs, steps_per_epoch, train_text_encoder, skip_data, args)
        if sample.at_first and state.global_step == 0:
            self._sample(context, state, epoch=None)
        self._loop(context, state)
        return self._finish(context, state)

    def _loop(self, ctx: "_LoopContext", state: TrainState) -> None:
        accelerator, run = ctx.accelerator, ctx.run
        progress = tqdm(total=ctx.max_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                        desc="steps", smoothing=0)
        recent: list[float] = []
        set_train_mode(ctx.optimizer, True)
        for epoch in range(state.epoch, ctx.max_epochs):
            ctx.train_set.select_epoch(epoch)
            loader = ctx.loader
            done_in_epoch = state.global_step - epoch * ctx.steps_per_epoch if ctx.skip_data else 0
            if done_in_epoch > 0:
                loader = accelerator.skip_first_batches(loader, done_in_epoch * run.gradient_accumulation_steps)
            accelerator.unwrap_model(ctx.network).on_epoch_start(ctx.models.text_encoders, ctx.models.denoiser)
            for batch_index, batch in enumerate(loader, start=max(done_in_epoch, 0) * run.gradient_accumulation_steps):
                ctx.train_set.set_current_step(state.global_step)
                micro_step = epoch * len(ctx.loader) + batch_index
                with accelerator.accumulate(ctx.network):
                    loss = self._step_loss(ctx, batch, micro_step)
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(f"loss is {loss.item()} at step {state.global_step + 1}; training stopped "
                                               "and nothing more was saved (earlier saves are intact)")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        average_gradients(accelerator, ctx.network)
                    if accelerator.sync_gradients and run.max_grad_norm:
                        accelerator.clip_grad_norm_(ctx.network.parameters(), run.max_grad_norm)
                    ctx.optimizer.step()
                    ctx.scheduler.step()
                    ctx.optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                state.global_step += 1
                progress.update(1)
                logs = self._after_step(ctx, loss.detach().item(), recent)
                progress.set_postfix(loss=f"{recent[-1]:.4f}", avr_loss=f"{sum(recent) / len(recent):.4f}",
                                     lr=f"{ctx.scheduler.get_last_lr()[0]:.2e}")
                accelerator.log(logs, step=state.global_step)
                self._maybe_validate(ctx, state, epoch_end=False)
                self._maybe_save_step(ctx, state)
                if ctx.sample.every_n_steps and state.global_step % ctx.sample.every_n_steps == 0:
                    self._sample(ctx, state, epoch=None)
                if state.global_step >= ctx.max_steps:
                    break
            state.epoch = epoch + 1
            accelerator.log({"loss/epoch": sum(recent) / max(len(recent), 1)}, step=state.global_step)
            self._maybe_validate(ctx, state, epoch_end=True)
            self._maybe_save_epoch(ctx, state)
            if ctx.sample.every_n_epochs and state.epoch % ctx.sample.every_n_epochs == 0:
                self._sample(ctx, state, epoch=state.epoch)
            if state.global_step >= ctx.max_steps:
                break
        progress.close()

    def _step_loss(self, ctx: "_LoopContext", batch: dict, step: int, validation: bool = False) -> torch.Tensor:
        models, device = ctx.models, ctx.accelerator.device
        weight_dtype = precision_dtype(ctx.run.mixed_precision)
        generator = seed_step(ctx.run.seed, step, ctx.accelerator.process_index, device, validation)
        multipliers = batch["network_multipliers"]
        if multipliers is not None:
            ctx.accelerator.unwrap_model(ctx.network).set_multiplier(float(multipliers[0]))
        with torch.no_grad():
            if batch["latents"] is not None:
                latents = batch["latents"].to(device, dtype=weight_dtype)
            else:
                latents = self.encode_images(models, batch["images"].to(device, dtype=models.vae.dtype)).to(weight_dtype)
        # Text encoding runs under autocast too: half-precision encoders carry fp32 LoRA weights.
        with ctx.accelerator.autocast():
            if batch["text_outputs"] is not None:
                text = {k: v.to(device) for k, v in batch["text_outputs"].items()}
            else:
                with torch.set_grad_enabled(ctx.train_text_encoder and not validation):
                    text = self.encode_text(models, batch["captions"])
            per_sample = self.compute_loss(models, _on_device(batch, device), latents, text, generator)
        return per_sample.mean()

    def _after_step(self, ctx: "_LoopContext", loss: float, recent: list[float]) -> dict[str, float]:
        recent.append(loss)
        if len(recent) > ctx.steps_per_epoch:
            recent.pop(0)
        logs = {"loss/current": loss, "loss/average": sum(recent) / len(recent)}
        network = ctx.accelerator.unwrap_model(ctx.network)
        if ctx.args.scale_weight_norms:
            scaled, mean_norm, max_norm = network.apply_max_norm_regularization(ctx.args.scale_weight_norms, ctx.accelerator.device)
            logs.update({"max_norm/keys_scaled": scaled, "max_norm/average_key_norm": mean_norm, "max_norm/max_key_norm": max_norm})
        for name, lr in zip(ctx.lr_names, ctx.scheduler.get_last_lr()):
            logs[f"lr/{name}"] = lr
        return logs

    # ------------------------------------------------------------------ validation
    def _maybe_validate(self, ctx: "_LoopContext", state: TrainState, *, epoch_end: bool) -> None:
        if ctx.val_set is None:
            return
        every_steps, every_epochs = ctx.args.validate_every_n_steps, ctx.args.validate_every_n_epochs
        if epoch_end:
            due = every_epochs is None or state.epoch % every_epochs == 0
        else:
            due = bool(every_steps) and state.global_step % every_steps == 0
        if not due:
            return
        ctx.models.denoiser.eval()
        set_train_mode(ctx.optimizer, False)
        losses = []
        ctx.val_set.select_epoch(0)
        limit = ctx.args.max_validation_steps or len(ctx.val_set)
        with torch.no_grad():
            for index in range(min(limit, len(ctx.val_set))):
                losses.append(self._step_loss(ctx, ctx.val_set[index], index, validation=True).item())
        ctx.models.denoiser.train(ctx.args.gradient_checkpointing)
        set_train_mode(ctx.optimizer, True)
        mean = sum(losses) / max(len(losses), 1)
        ctx.accelerator.log({"loss/validation": mean}, step=state.global_step)
        logger.info("validation loss %.5f at step %d", mean, state.global_step)

    # ------------------------------------------------------------------ saving
    def _save_lora(self, ctx: "_LoopContext", file_name: str, state: TrainState) -> Path:
        path = ctx.save.output_dir / file_name
        metadata = dict(ctx.metadata, ss_epoch=str(state.epoch), ss_steps=str(state.global_step),
                        ss_training_finished_at=str(time.time()))
        if ctx.save.no_metadata:
            metadata = minimum_metadata(metadata)
        ctx.accelerator.unwrap_model(ctx.network).save_weights(str(path), ctx.save.dtype, metadata)
        logger.info("saved %s", path)
        return path

    def _save_state(self, ctx: "_LoopContext", folder_name: str, state: TrainState) -> None:
        save_state_folder(ctx.save.output_dir / folder_name, state, ctx.accelerator.save_state,
                          is_main=ctx.accelerator.is_main_process, barrier=ctx.accelerator.wait_for_everyone)

    def _maybe_save_step(self, ctx: "_LoopContext", state: TrainState) -> None:
        save, step = ctx.save, state.global_step
        if save.every_n_steps and step % save.every_n_steps == 0 and step < ctx.max_steps:
            self._periodic_save(ctx, state, step_file_name(save.output_name, step, save.ext), step_state_name(save.output_name, step),
                                lambda suffix: step_pattern(save.output_name, suffix),
                                save.last_n_steps and steps_keep_count(save.last_n_steps, save.every_n_steps),
                                save.last_n_steps_state and steps_keep_count(save.last_n_steps_state, save.every_n_steps))

    def _maybe_save_epoch(self, ctx: "_LoopContext", state: TrainState) -> None:
        save, epoch = ctx.save, state.epoch
        if save.every_n_epochs and epoch % save.every_n_epochs == 0 and epoch < ctx.max_epochs:
            self._periodic_save(ctx, state, epoch_file_name(save.output_name, epoch, save.ext), epoch_state_name(save.output_name, epoch),
                                lambda suffix: epoch_pattern(save.output_name, suffix), save.last_n_epochs, save.last_n_epochs_state)

    def _periodic_save(self, ctx: "_LoopContext", state: TrainState, file_name: str, state_name: str,
                       pattern: Callable[[str], str], keep_files: int | None, keep_states: int | None) -> None:
        """Save the LoRA (and the state with --save_state), then drop saves older than --save_last_n_*."""
        save, main = ctx.save, ctx.accelerator.is_main_process
        ctx.accelerator.wait_for_everyone()
        if main:
            self._save_lora(ctx, file_name, state)
            if keep_files:
                rotate(save.output_dir, pattern(save.ext), keep_files)
        if save.save_state:
            self._save_state(ctx, state_name, state)
            if keep_states and main:
                rotate(save.output_dir, pattern("-state"), keep_states)

    def _finish(self, ctx: "_LoopContext", state: TrainState) -> Path | None:
        ctx.accelerator.wait_for_everyone()
        path = None
        if ctx.accelerator.is_main_process:
            path = self._save_lora(ctx, ctx.save.output_name + ctx.save.ext, state)
        if ctx.save.save_state or ctx.save.save_state_on_train_end:
            self._save_state(ctx, last_state_name(ctx.save.output_name), state)
        ctx.accelerator.end_training()
        return path

    # ------------------------------------------------------------------ sampling
    def _sample(self, ctx: "_LoopContext", state: TrainState, *, epoch: int | None) -> None:
        if ctx.sample.prompts_file is None or not ctx.accelerator.is_main_process:
            return
        ctx.models.denoiser.eval()
        with torch.no_grad(), ctx.accelerator.autocast():
            paths = self.sample_images(ctx.models, ctx.sample, step=state.global_step, epoch=epoch, device=ctx.accelerator.device)
        ctx.models.denoiser.train(ctx.args.gradient_checkpointing)
        for path in paths:
            logger.info("sample image %s", path)

    # ------------------------------------------------------------------ setup pieces
    def _make_accelerator(self, args: argparse.Namespace, run: RunConfig) -> Accelerator:
        log_with = args.log_with or ("tensorboard" if args.logging_dir else None)
        if log_with in ("wandb", "all") and args.wandb_api_key:
            import wandb

            wandb.login(key=args.wandb_api_key)
        trackers = ["tensorboard", "wandb"] if log_with == "all" else log_with
        logging_dir = None
        if args.logging_dir:
            logging_dir = str(Path(args.logging_dir) / ((args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S")))
        project = ProjectConfiguration(project_dir=logging_dir or args.output_dir, logging_dir=logging_dir)
        kwargs_handlers = []
        if args.ddp_timeout or args.ddp_gradient_as_bucket_view or args.ddp_static_graph:
            from datetime import timedelta

            from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

            if args.ddp_timeout:
                kwargs_handlers.append(InitProcessGroupKwargs(timeout=timedelta(minutes=args.ddp_timeout)))
            kwargs_handlers.append(DistributedDataParallelKwargs(gradient_as_bucket_view=args.ddp_gradient_as_bucket_view,
                                                                 static_graph=args.ddp_static_graph))
        accelerator = Accelerator(gradient_accumulation_steps=run.gradient_accumulation_steps, mixed_precision=run.mixed_precision,
                                  log_with=trackers, project_config=project, kwargs_handlers=kwargs_handlers,
                                  dynamo_backend=args.dynamo_backend if args.torch_compile else None)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and accelerator.num_processes == 1:
            raise ValueError(f"launched as {launched} processes but accelerate runs each alone (no GPU found?); "
                             "on CPU set ACCELERATE_USE_CPU=true for a multi-process run")
        return accelerator

    def _init_trackers(self, accelerator: Accelerator, args: argparse.Namespace) -> None:
        if not (args.log_with or args.logging_dir):
            return
        name = args.log_tracker_name or "network_train"
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))} if args.log_config else {}
        init_kwargs = {}
        if args.wandb_run_name:
            init_kwargs["wandb"] = {"name": args.wandb_run_name}
        if args.log_tracker_config:
            import toml

            init_kwargs.update(toml.load(args.log_tracker_config))
        accelerator.init_trackers(name, config=config, init_kwargs=init_kwargs)

    def _check_cache_conflicts(self, args: argparse.Namespace, train_set: TrainDataset) -> None:
        problems = []
        if args.cache_latents or args.cache_latents_to_disk:
            problems += latent_cache_conflicts(train_set.configs)
        if args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk:
            problems += text_cache_conflicts(train_set.configs)
            if args.network_train_text_encoder_only:
                problems.append("--cache_text_encoder_outputs leaves nothing to train with --network_train_text_encoder_only")
        if problems:
            raise ValueError("; ".join(problems))

    def _report_dataset(self, train_set: TrainDataset, run: RunConfig) -> None:
        logger.info("%d training images, %d regularisation images, %d batches per epoch",
                    train_set.num_train_images, train_set.num_reg_images, len(train_set))
        for reso, count in train_set.bucket_summary():
            logger.info("bucket %dx%d: %d images", reso[0], reso[1], count)
        if train_set.skipped_images:
            logger.warning("%d unreadable images were skipped", len(train_set.skipped_images))
        if len(train_set) == 0:
            raise ValueError("the dataset has no images; check image_dir / --train_data_dir")

    def _freeze(self, models: Models) -> None:
        for module in [models.denoiser, models.vae, *models.text_encoders]:
            module.requires_grad_(False)
            module.eval()

    def _cache_latents(self, args, models: Models, train_set, val_set, producer: str, device, vae_dtype, accelerator) -> None:
        models.vae.to(device, dtype=vae_dtype)
        if not (args.cache_latents or args.cache_latents_to_disk):
            return
        with torch.no_grad(), accelerator.main_process_first():
            for dataset in filter(None, [train_set, val_set]):
                dataset.cache_latents(lambda images: self.encode_images(models, images.to(device, vae_dtype)).float().cpu(),
                                      producer, to_disk=args.cache_latents_to_disk, batch_size=args.vae_batch_size,
                                      skip_check=args.skip_cache_check, show_progress=accelerator.is_local_main_process)
        if not self._needs_vae_for_sampling(args):
            models.vae.to("cpu")

    def _cache_text(self, args, models: Models, train_set, val_set, producer: str, device, dtype, accelerator) -> None:
        for encoder in models.text_encoders:
            encoder.to(device, dtype=dtype)
        batch_size = args.text_encoder_batch_size or args.vae_batch_size
        with torch.no_grad(), accelerator.main_process_first():
            for dataset in filter(None, [train_set, val_set]):
                dataset.cache_text_outputs(lambda captions: {k: v.float().cpu() for k, v in self.encode_text(models, captions).items()},
                                           producer, to_disk=args.cache_text_encoder_outputs_to_disk, batch_size=batch_size,
                                           skip_check=args.skip_cache_check)
        if not self._needs_vae_for_sampling(args):
            for encoder in models.text_encoders:
                encoder.to("cpu")

    @staticmethod
    def _needs_vae_for_sampling(args: argparse.Namespace) -> bool:
        return bool(args.sample_prompts) or args.highvram

    def _create_network(self, args, models: Models, train_text_encoder: bool, accelerator: Accelerator):
        module = importlib.import_module(args.network_module or "networks.lora")
        net_kwargs = parse_network_args(args.network_args or [])
        text_encoder = models.text_encoders[0] if len(models.text_encoders) == 1 else models.text_encoders
        if args.base_weights:
            multipliers = args.base_weights_multiplier or [1.0] * len(args.base_weights)
            for path, multiplier in zip(args.base_weights, multipliers):
                base, weights = module.create_network_from_weights(multiplier, path, models.vae, text_encoder, models.denoiser, for_inference=True)
                base.merge_to(text_encoder, models.denoiser, weights, models.denoiser.dtype if hasattr(models.denoiser, "dtype") else torch.float32,
                              "cpu")
                logger.info("merged base weights %s (multiplier %s)", path, multiplier)
        if args.dim_from_weights:
            network, _ = module.create_network_from_weights(1.0, args.network_weights, models.vae, text_encoder, models.denoiser, **net_kwargs)
        else:
            network = module.create_network(1.0, args.network_dim, args.network_alpha, models.vae, text_encoder, models.denoiser,
                                            neuron_dropout=args.network_dropout, **net_kwargs)
        if network is None:
            raise ValueError(f"--network_module {args.network_module} created no network")
        network.apply_to(text_encoder, models.denoiser, train_text_encoder, not args.network_train_text_encoder_only)
        if args.network_weights:
            info = network.load_weights(args.network_weights)
            logger.info("loaded network weights from %s: %s", args.network_weights, info)
        network.prepare_grad_etc(text_encoder, models.denoiser)
        return network

    def _metadata(self, args, models: Models, train_set: TrainDataset, optimizer_name: str, max_steps: int, run: RunConfig) -> dict[str, str]:
        from library.metadata import lora_training_metadata

        fields = dict(
            network_module=args.network_module or "networks.lora", network_dim=args.network_dim, network_alpha=args.network_alpha,
            network_args=parse_network_args(args.network_args or []), training_started_at=time.time(),
            num_train_images=train_set.num_train_images, num_reg_images=train_set.num_reg_images,
            num_batches_per_epoch=len(train_set), tag_frequency=train_set.tag_frequency(), dataset_dirs=train_set.dataset_dirs_info(),
            learning_rate=args.learning_rate, unet_lr=args.unet_lr, text_encoder_lr=args.text_encoder_lr, optimizer=optimizer_name,
            lr_scheduler=args.lr_scheduler, lr_warmup_steps=args.lr_warmup_steps, max_train_steps=max_steps, seed=run.seed,
            mixed_precision=run.mixed_precision, full_fp16=args.full_fp16, gradient_checkpointing=args.gradient_checkpointing,
            gradient_accumulation_steps=run.gradient_accumulation_steps, max_grad_norm=run.max_grad_norm, clip_skip=args.clip_skip,
            noise_offset=args.noise_offset, multires_noise_iterations=args.multires_noise_iterations,
            multires_noise_discount=args.multires_noise_discount, min_snr_gamma=args.min_snr_gamma, training_comment=args.training_comment,
            max_token_length=args.max_token_length, prior_loss_weight=args.prior_loss_weight, loss_type=args.loss_type,
            huber_schedule=args.huber_schedule, huber_c=args.huber_c, ip_noise_gamma=args.ip_noise_gamma,
            debiased_estimation=args.debiased_estimation_loss, zero_terminal_snr=args.zero_terminal_snr, bucket_info=train_set.bucket_summary(),
        )
        metadata = lora_training_metadata(**fields)
        metadata.update(self.model_metadata(args, models))
        return metadata


@dataclass
class _LoopContext:
    """Everything the loop's pieces share; built once in train()."""

    accelerator: Accelerator
    models: Models
    network: Any
    optimizer: Any
    scheduler: Any
    loader: Any
    train_set: TrainDataset
    val_set: TrainDataset | None
    save: SaveConfig
    sample: SampleConfig
    metadata: dict[str, str]
    lr_names: list[str]
    run: RunConfig
    max_steps: int
    max_epochs: int
    steps_per_epoch: int
    train_text_encoder: bool
    skip_data: bool  # resuming (or --skip_until_initial_step): skip the batches already trained on in this epoch
    args: argparse.Namespace


def initial_state(args: argparse.Namespace, steps_per_epoch: int, seed: int) -> TrainState:
    """Where a fresh run starts: --initial_step (0-based) or --initial_epoch (1-based), as in sd-scripts."""
    if args.initial_step is not None:
        step = args.initial_step
    elif args.initial_epoch is not None:
        step = (args.initial_epoch - 1) * steps_per_epoch
    else:
        step = 0
    return TrainState(epoch=step // steps_per_epoch, global_step=step, seed=seed)


def show_dataset(dataset: TrainDataset, epoch: int = 0) -> None:
    """--debug_dataset: print every batch of one epoch (bucket, images, processed captions) instead of training."""
    dataset.select_epoch(epoch)
    for index in range(len(dataset)):
        batch = dataset[index]
        pixels = batch["latents"] if batch["latents"] is not None else batch["images"]
        print(f"batch {index}: {tuple(pixels.shape)}  loss weights {batch['loss_weights'].tolist()}")
        for key, caption in zip(batch["keys"], batch["captions"]):
            print(f"  {key}: {caption}")


def check_input_files(args: argparse.Namespace) -> None:
    """Every file or folder a flag names must exist, checked before anything slow happens."""
    named = {"--vae": args.vae, "--network_weights": args.network_weights, "--resume": args.resume,
             "--sample_prompts": args.sample_prompts, "--dataset_config": args.dataset_config,
             "--train_data_dir": args.train_data_dir, "--reg_data_dir": args.reg_data_dir, "--in_json": args.in_json}
    named.update({f"--base_weights {path}": path for path in args.base_weights or []})
    for flag, path in named.items():
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{flag.split()[0]} {path}: not found")
    if args.base_weights_multiplier and len(args.base_weights_multiplier) != len(args.base_weights or []):
        raise ValueError("--base_weights_multiplier needs one value per --base_weights file")


def log_flag_notes(args: argparse.Namespace) -> None:
    """Flags that select something we always do, said once so nobody thinks they were ignored."""
    if args.xformers or args.mem_eff_attn or args.sdpa:
        logger.info("attention: PyTorch scaled_dot_product_attention (it picks flash / memory-efficient kernels itself)")
    if args.lowram:
        logger.info("--lowram: safetensors checkpoints are memory-mapped, so models never sit in RAM twice")


def parse_network_args(items: list[str]) -> dict[str, str]:
    """--network_args "conv_dim=4" "rank_dropout=0.1" → {"conv_dim": "4", ...} (values stay strings, as sd-scripts passes them)."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--network_args: '{item}' is not key=value")
        parsed[key.strip()] = value.strip()
    return parsed


def set_seed(seed: int, process_index: int) -> None:
    import random

    import numpy as np

    random.seed(seed + process_index)
    np.random.seed((seed + process_index) % 2**32)
    torch.manual_seed(seed + process_index)


def seed_step(seed: int, micro_step: int, process_index: int, device: torch.device, validation: bool) -> torch.Generator:
    """Seed everything random in one micro-step from (seed, step, rank, stream) alone.

    Noise and timesteps come from the returned generator; LoRA dropouts use the global RNG, reseeded here.
    A resumed run therefore draws exactly what the uninterrupted run drew at the same step.
    """
    stream = 1 if validation else 0
    derived = (seed * 1_000_003 + micro_step * 1_009 + process_index * 7 + stream) % (2**63)
    if not validation:
        torch.manual_seed(derived)
    generator = torch.Generator(device=device)
    generator.manual_seed(derived ^ 0x5DEECE66D)
    return generator


def average_gradients(accelerator: Accelerator, network: torch.nn.Module) -> None:
    """Average the LoRA gradients over all processes, in one all-reduce.

    DDP's own all-reduce is armed by the wrapped module's forward(), and the LoRA network's forward is never
    called: its modules are patched into the U-Net and text encoders. Without this every rank would step on
    its own gradients and the copies would drift apart (sd-scripts' all_reduce_network does the same).
    """
    grads = [p.grad for p in network.parameters() if p.grad is not None]
    if accelerator.num_processes == 1 or not grads:
        return
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(part.view_as(grad))


def _on_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _first(items: list) -> Any:
    return items[0]
