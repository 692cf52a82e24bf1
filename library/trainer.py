"""NetworkTrainer: the one LoRA training loop every model family shares.

Read `train()` top to bottom: flags → dataset → models → caches → network → optimizer → loop → files.
A family (SD1/2, SDXL, SD3) subclasses NetworkTrainer and overrides only the hooks in the first
section below; everything else is shared.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm import tqdm

from library.args import log_notes, parse_flags
from library.console import exit_on_user_error, setup_logging
from library.dataset.cache import latent_cache_conflicts, text_cache_conflicts
from library.dataset.config import DatasetOptions, load_dataset_configs
from library.dataset.dataset import TrainDataset, split_validation
from library.compile import compile_blocks
from library.dry_run import format_dry_run, plan_dry_run
from library.fp8 import Fp8Layout, Fp8Parts, move_keeping_fp8
from library.hub_models import resolve_hub_models
from library.lr_schedulers import SchedulerConfig, build_lr_scheduler
from library.metadata import BaseModelFacts
from library.models.tokenizers import TokenizerUnavailable
from library.optim import OptimizerConfig, build_optimizer, set_train_mode
from library.resume import ResumePoint, read_resume_point, restore
from library.run_config import RunConfig, SampleConfig, SaveConfig, ValidationConfig
from library.run_metadata import RunMetadata, run_metadata
from library.sample_prompts import load_sample_prompts
from library.saving import (
    epoch_file_name,
    epoch_pattern,
    epoch_state_name,
    last_state_name,
    rotate,
    step_file_name,
    step_pattern,
    step_state_name,
    steps_keep_count,
)
from library.train_state import TrainState, save_state_folder
from library.trainer_setup import (
    allow_fp16_gradients,
    any_rank_diverged,
    average_gradients,
    base_weights_identity,
    check_input_files,
    create_network,
    init_trackers,
    initial_state,
    log_flag_notes,
    make_accelerator,
    merge_base_weights,
    models_for_network,
    seed_step,
    set_seed,
    show_dataset,
)
from library.weighted_captions import check_weighted_captions
from networks.network_module import optimizer_params
from networks.plugin_view import NetworkModels

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

    def text_encoder_arg(self) -> Any:
        """The text encoder(s) as sd-scripts' network modules take them: one module, or a list."""
        return self.text_encoders[0] if len(self.text_encoders) == 1 else self.text_encoders


class NetworkTrainer:
    # ------------------------------------------------------------------ family hooks
    # Which frozen layers --fp8_base / --fp8_base_unet store in fp8 (library/fp8.py). The loop applies them once the
    # caches are filled (caches come from the full-precision models, as in sd-scripts) and before the network wraps
    # the layers. None: the family stores nothing this way (SD3 stores its fp8 parts while loading).
    fp8_denoiser_layout: Fp8Layout | None = None
    fp8_text_encoder_layout: Fp8Layout | None = None
    # Model flags whose loader reads diffusers folders, so a hub repo id may name one (library/hub_models.py).
    hub_folder_flags: tuple[str, ...] = ("pretrained_model_name_or_path", "vae")

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

    def model_facts(self, args: argparse.Namespace, models: Models) -> BaseModelFacts:
        """What the LoRA's metadata says about the base model (ss_base_model_version, ss_v2, modelspec.*)."""
        raise NotImplementedError

    def model_metadata(self, args: argparse.Namespace, models: Models) -> dict[str, str]:
        """The family's own ss_* keys (sd-scripts' update_metadata); they win over shared keys of the same name."""
        return {}

    def encode_prompts(self, models: Models, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """encode_text for preview prompts: outputs computed before the text encoders left the GPU when they are
        cached, else a fresh encode. Families call this from sample_images."""
        stored = getattr(self, "_prompt_outputs", {})
        if all(prompt in stored for prompt in prompts):
            return {key: torch.cat([stored[p][key] for p in prompts]).to(device) for key in stored[prompts[0]]}
        return self.encode_text(models, prompts)

    def place_denoiser(self, args: argparse.Namespace, models: Models, device: torch.device, dtype: torch.dtype,
                       resolutions: list[tuple[int, int]]) -> None:
        """Put the frozen denoiser on the training device (a family with block swap or fp8 weights does more).
        `resolutions` are the (width, height) buckets training will use."""
        move_keeping_fp8(models.denoiser, device, dtype)

    def place_text_encoders(self, args: argparse.Namespace, run: RunConfig, models: Models, device: torch.device) -> None:
        """Put the frozen text encoders where they encode: the training device, in the base-weight dtype
        (SD3 keeps T5-XXL where --t5xxl_device / --t5xxl_dtype say)."""
        for encoder in models.text_encoders:
            move_keeping_fp8(encoder, device, run.weight_dtype)

    # ------------------------------------------------------------------ the run
    def train(self, args: argparse.Namespace) -> Path | None:
        args = resolve_hub_models(args, self.hub_folder_flags)
        resumed = read_resume_point(args.resume) if args.resume else None
        run = RunConfig.from_args(args, resumed_seed=resumed.state.seed if resumed else None)
        fp8 = Fp8Parts.from_args(args)
        log_flag_notes(args)
        check_input_files(args)
        self.check_model_files(args)
        accelerator = make_accelerator(args, run)
        if accelerator.num_processes > 1:  # a seed drawn at random must be the same on every process
            run = dataclasses.replace(run, seed=broadcast_object_list([run.seed])[0])
        set_seed(run.seed, accelerator.process_index)

        dataset_options = DatasetOptions.from_args(args)
        train_set, val_set = split_validation(load_dataset_configs(dataset_options), dataset_options, seed=run.seed)
        self._check_cache_conflicts(args, train_set)
        if args.weighted_captions:
            check_weighted_captions([train_set, val_set], args.sample_prompts)
        _report_dataset(train_set)
        if args.debug_dataset:
            show_dataset(train_set)
            return None
        if args.dry_run:  # stop where the models would load: report the rest of the run from flags and file headers
            plan = plan_dry_run(self, args, run, accelerator.num_processes, train_set, val_set)
            check_bucket_sizes(train_set, plan.pixel_multiple)
            print(format_dry_run(plan), end="")
            return None

        models = self.prepare_models(args)
        check_bucket_sizes(train_set, models.vae.downscale * models.denoiser.latent_multiple)
        train_text_encoder = not args.network_train_unet_only and not args.cache_text_encoder_outputs
        if args.cache_text_encoder_outputs and not args.network_train_unet_only:
            logger.info("text-encoder outputs are cached, so only the denoiser's LoRA trains (as --network_train_unet_only)")
        self._cache_inputs(args, run, models, train_set, val_set, accelerator)
        self._store_in_fp8(fp8, models)
        network_models = models_for_network(args, models.text_encoder_arg(), models.denoiser)
        network = create_network(args, models.vae, models.text_encoder_arg(), models.denoiser, train_text_encoder,
                                 network_models)
        self._place_models(args, run, models, network, train_text_encoder, accelerator.device,
                           [reso for reso, _ in train_set.bucket_summary()])

        ctx = self._make_loop(args, run, accelerator, models, network, train_set, val_set, train_text_encoder, resumed,
                              network_models)
        if ctx.sample.at_first and ctx.state.global_step == 0:
            self._sample(ctx, epoch=None)
        self._loop(ctx)
        return self._finish(ctx)

    def prepare_models(self, args: argparse.Namespace) -> Models:
        """The family's models, frozen, with --base_weights merged in (also used by the cache prefill tools)."""
        models = self.load_models(args)
        for module in [models.denoiser, models.vae, *models.text_encoders]:
            module.requires_grad_(False)
            module.eval()
        merge_base_weights(args, models.vae, models.text_encoder_arg(), models.denoiser)
        return models

    def cache_keys(self, args: argparse.Namespace) -> tuple[str, str]:
        """The family's producer strings plus what the shared setup changes: merged base weights, text precision."""
        latents, text = self.cache_producers(args)
        return latents, f"{text}:{args.mixed_precision}{base_weights_identity(args)}"

    def _cache_inputs(self, args, run: RunConfig, models: Models, train_set, val_set, accelerator: Accelerator) -> None:
        device, datasets = accelerator.device, [d for d in (train_set, val_set) if d is not None]
        latent_key, text_key = self.cache_keys(args)
        models.vae.to(device, dtype=run.vae_dtype)
        with torch.no_grad(), accelerator.main_process_first():
            if args.cache_latents:
                for dataset in datasets:
                    dataset.cache_latents(lambda images: self.encode_images(models, images.to(device, run.vae_dtype)).float().cpu(),
                                          latent_key, to_disk=args.cache_latents_to_disk, batch_size=args.vae_batch_size,
                                          skip_check=args.skip_cache_check, show_progress=accelerator.is_local_main_process)
            if args.cache_text_encoder_outputs:
                self.place_text_encoders(args, run, models, device)
                for dataset in datasets:
                    dataset.cache_text_outputs(lambda captions: {k: v.float().cpu() for k, v in self.encode_text(models, captions).items()},
                                               text_key, to_disk=args.cache_text_encoder_outputs_to_disk,
                                               batch_size=args.text_encoder_batch_size or args.vae_batch_size,
                                               skip_check=args.skip_cache_check)
            if args.cache_text_encoder_outputs and args.sample_prompts:
                # Encode the preview prompts now, so the (frozen) text encoders can leave the GPU for the whole run.
                prompts = {text for p in load_sample_prompts(Path(args.sample_prompts)) for text in (p.prompt, p.negative_prompt)}
                self._prompt_outputs = {text: {k: v.cpu() for k, v in self.encode_text(models, [text]).items()}
                                        for text in sorted(prompts)}
        if args.cache_latents and not (args.sample_prompts or args.highvram):  # previews decode with the VAE
            models.vae.to("cpu")
        if args.cache_text_encoder_outputs and not args.highvram:
            for encoder in models.text_encoders:
                encoder.to("cpu")

    def _store_in_fp8(self, fp8: Fp8Parts, models: Models) -> None:
        if fp8.denoiser and self.fp8_denoiser_layout is not None:
            count = self.fp8_denoiser_layout.store(models.denoiser)
            logger.info("fp8 base: %d denoiser weights stored in float8_e4m3fn", count)
        if fp8.text_encoders and self.fp8_text_encoder_layout is not None:
            count = sum(self.fp8_text_encoder_layout.store(encoder) for encoder in models.text_encoders)
            logger.info("fp8 base: %d text-encoder weights stored in float8_e4m3fn", count)

    def _place_models(self, args, run: RunConfig, models: Models, network, train_text_encoder: bool, device,
                      resolutions: list[tuple[int, int]]) -> None:
        self.place_denoiser(args, models, device, run.weight_dtype, resolutions)
        if not args.cache_text_encoder_outputs:
            self.place_text_encoders(args, run, models, device)
        if run.gradient_checkpointing:
            models.denoiser.set_gradient_checkpointing(True, cpu_offload=args.cpu_offload_checkpointing)
            if train_text_encoder:
                for encoder in models.text_encoders:
                    enable_text_encoder_checkpointing(encoder)
        if args.torch_compile:
            compile_blocks(models.denoiser.blocks, args.dynamo_backend)
        if run.full_precision_lora:
            network.to(run.weight_dtype)

    def _make_loop(self, args, run: RunConfig, accelerator: Accelerator, models: Models, network, train_set: TrainDataset,
                   val_set: TrainDataset | None, train_text_encoder: bool, resumed: ResumePoint | None,
                   network_models: NetworkModels) -> "_LoopContext":
        """Optimizer, scheduler and data loader through accelerate, and where the run starts."""
        params, lr_names = optimizer_params(network, args.text_encoder_lr, args.unet_lr, args.learning_rate)
        optimizer_name, optimizer = build_optimizer(OptimizerConfig.from_args(args), params)
        workers = args.max_data_loader_n_workers
        loader = torch.utils.data.DataLoader(train_set, batch_size=1, shuffle=False, collate_fn=_first, num_workers=workers,
                                             persistent_workers=args.persistent_data_loader_workers and workers > 0)
        steps_per_epoch = run.steps_per_epoch(len(loader), accelerator.num_processes)
        max_steps, max_epochs = run.total_steps(steps_per_epoch)
        for dataset in (train_set, val_set):
            if dataset is not None:
                dataset.set_max_train_steps(max_steps)
        scheduler = build_lr_scheduler(SchedulerConfig.from_args(args), optimizer, num_training_steps=max_steps,
                                       num_processes=accelerator.num_processes)
        network, optimizer, loader, scheduler = accelerator.prepare(network, optimizer, loader, scheduler)
        if run.full_precision_lora:
            allow_fp16_gradients(accelerator)

        state = initial_state(args, steps_per_epoch, run.seed)
        if resumed is not None:
            state = restore(resumed, accelerator, network, optimizer, steps_per_epoch=steps_per_epoch, seed=run.seed,
                            optimizer_config=OptimizerConfig.from_args(args))
            logger.info("resumed from %s at epoch %d, step %d", args.resume, state.epoch, state.global_step)
        if resumed is None or resumed.from_sd_scripts:  # our state folders bring the scheduler's own state
            for _ in range(state.global_step):
                scheduler.step()  # the schedule continues where --initial_step (or the sd-scripts state) says the run stands

        metadata = run_metadata(args, self.model_facts(args, models), self.model_metadata(args, models), train_set, val_set,
                                optimizer_name=optimizer_name, num_batches_per_epoch=len(loader), max_steps=max_steps,
                                max_epochs=max_epochs, run=run, num_processes=accelerator.num_processes)
        init_trackers(accelerator, args)
        logger.info("steps per epoch %d, epochs %d, total optimizer steps %d, optimizer %s", steps_per_epoch, max_epochs,
                    max_steps, optimizer_name)
        return _LoopContext(
            accelerator=accelerator, models=models, network=network, optimizer=optimizer, scheduler=scheduler, loader=loader,
            train_set=train_set, val_set=val_set, save=SaveConfig.from_args(args, max_epochs), sample=SampleConfig.from_args(args),
            validation=ValidationConfig.from_args(args), metadata=metadata, lr_names=lr_names, run=run, max_steps=max_steps,
            max_epochs=max_epochs, steps_per_epoch=steps_per_epoch, train_text_encoder=train_text_encoder,
            skip_data=args.skip_until_initial_step or resumed is not None, network_models=network_models, state=state)

    # ------------------------------------------------------------------ the loop
    def _loop(self, ctx: "_LoopContext") -> None:
        accelerator, run, state = ctx.accelerator, ctx.run, ctx.state
        progress = tqdm(total=ctx.max_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                        desc="steps", smoothing=0)
        recent: list[float] = []
        self._set_training(ctx, True)
        for epoch in range(state.epoch, ctx.max_epochs):
            ctx.train_set.select_epoch(epoch)
            loader, done = ctx.loader, state.global_step - epoch * ctx.steps_per_epoch if ctx.skip_data else 0
            if done > 0:
                loader = accelerator.skip_first_batches(loader, done * run.gradient_accumulation_steps)
            accelerator.unwrap_model(ctx.network).on_epoch_start(ctx.network_models.text_encoder, ctx.network_models.denoiser)
            for batch_index, batch in enumerate(loader, start=max(done, 0) * run.gradient_accumulation_steps):
                ctx.train_set.set_current_step(state.global_step)
                if self._optimizer_step(ctx, batch, epoch * len(ctx.loader) + batch_index, recent):
                    progress.update(1)
                    progress.set_postfix(loss=f"{recent[-1]:.4f}", avr_loss=f"{sum(recent) / len(recent):.4f}",
                                         lr=f"{ctx.scheduler.get_last_lr()[0]:.2e}")
                    self._after_step(ctx)
                if state.global_step >= ctx.max_steps:
                    break
            # An epoch counts once all its steps ran; a run that stops mid-epoch resumes inside it.
            if state.global_step >= (epoch + 1) * ctx.steps_per_epoch:
                state.epoch = epoch + 1
                accelerator.log({"loss/epoch": sum(recent) / max(len(recent), 1)}, step=state.global_step)
                self._after_epoch(ctx)
            if state.global_step >= ctx.max_steps:
                break
        progress.close()

    def _optimizer_step(self, ctx: "_LoopContext", batch: dict, micro_step: int, recent: list[float]) -> bool:
        """One micro-batch; returns True when it completed an optimizer step."""
        accelerator, state = ctx.accelerator, ctx.state
        with accelerator.accumulate(ctx.network):
            loss = self._step_loss(ctx, batch, micro_step)
            if any_rank_diverged(accelerator, loss):
                raise TrainingDiverged(f"loss is {loss.item()} at step {state.global_step + 1}; training stopped "
                                       "and nothing more was saved (earlier saves are intact)")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                average_gradients(accelerator, ctx.network)
                if ctx.run.max_grad_norm:
                    accelerator.clip_grad_norm_(ctx.network.parameters(), ctx.run.max_grad_norm)
            ctx.optimizer.step()
            ctx.scheduler.step()
            ctx.optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            return False
        state.global_step += 1
        recent.append(loss.detach().item())
        del recent[: -ctx.steps_per_epoch]
        accelerator.log(self._step_logs(ctx, recent), step=state.global_step)
        return True

    def _after_step(self, ctx: "_LoopContext") -> None:
        state = ctx.state
        self._maybe_validate(ctx, epoch_end=False)
        self._maybe_save_step(ctx)
        if ctx.sample.every_n_steps and state.global_step % ctx.sample.every_n_steps == 0:
            self._sample(ctx, epoch=None)

    def _after_epoch(self, ctx: "_LoopContext") -> None:
        self._maybe_validate(ctx, epoch_end=True)
        self._maybe_save_epoch(ctx)
        if ctx.sample.every_n_epochs and ctx.state.epoch % ctx.sample.every_n_epochs == 0:
            self._sample(ctx, epoch=ctx.state.epoch)

    def _step_loss(self, ctx: "_LoopContext", batch: dict, step: int, validation: bool = False) -> torch.Tensor:
        models, device = ctx.models, ctx.accelerator.device
        generator = seed_step(ctx.run.seed, step, ctx.accelerator.process_index, device, validation)
        if batch["network_multipliers"] is not None:
            ctx.accelerator.unwrap_model(ctx.network).set_multiplier(float(batch["network_multipliers"][0]))
        # Latents stay float32: noise, noisy input and target are formed at full precision (as sd-scripts does);
        # autocast casts the denoiser's input where its first layer runs.
        with torch.no_grad():
            if batch["latents"] is not None:
                latents = batch["latents"].to(device, dtype=torch.float32)
            else:
                latents = self.encode_images(models, batch["images"].to(device, dtype=models.vae.dtype)).float()
        # Text encoding runs under autocast too: half-precision encoders carry fp32 LoRA weights.
        with ctx.accelerator.autocast():
            if batch["text_outputs"] is not None:
                text = {k: v.to(device) for k, v in batch["text_outputs"].items()}
            else:
                with torch.set_grad_enabled(ctx.train_text_encoder and not validation):
                    text = self.encode_text(models, batch["captions"])
            per_sample = self.compute_loss(models, _on_device(batch, device), latents, text, generator)
        return per_sample.mean()

    def _step_logs(self, ctx: "_LoopContext", recent: list[float]) -> dict[str, float]:
        logs = {"loss/current": recent[-1], "loss/average": sum(recent) / len(recent)}
        if ctx.run.scale_weight_norms:
            network = ctx.accelerator.unwrap_model(ctx.network)
            scaled, mean_norm, max_norm = network.apply_max_norm_regularization(ctx.run.scale_weight_norms, ctx.accelerator.device)
            logs.update({"max_norm/keys_scaled": scaled, "max_norm/average_key_norm": mean_norm, "max_norm/max_key_norm": max_norm})
        for name, lr in zip(ctx.lr_names, ctx.scheduler.get_last_lr()):
            logs[f"lr/{name}"] = lr
        return logs

    def _set_training(self, ctx: "_LoopContext", training: bool) -> None:
        """Train or eval mode for everything that has one: the LoRA network (its dropouts), the denoiser
        (checkpointing only runs in training), text encoders being trained, and schedule-free optimizers
        (whose eval weights are the averaged ones that get saved)."""
        ctx.accelerator.unwrap_model(ctx.network).train(training)
        ctx.models.denoiser.train(training and ctx.run.gradient_checkpointing)
        for encoder in ctx.models.text_encoders:
            encoder.train(training and ctx.train_text_encoder and ctx.run.gradient_checkpointing)
        set_train_mode(ctx.optimizer, training)

    @contextlib.contextmanager
    def _evaluating(self, ctx: "_LoopContext") -> Iterator[None]:
        self._set_training(ctx, False)
        try:
            yield
        finally:
            self._set_training(ctx, True)

    # ------------------------------------------------------------------ validation
    def _maybe_validate(self, ctx: "_LoopContext", *, epoch_end: bool) -> None:
        state = ctx.state
        if ctx.val_set is None or not ctx.validation.due(step=state.global_step, epoch=state.epoch, epoch_end=epoch_end):
            return
        ctx.val_set.select_epoch(0)
        batches = min(ctx.validation.max_batches or len(ctx.val_set), len(ctx.val_set))
        with self._evaluating(ctx), torch.no_grad():
            losses = [self._step_loss(ctx, ctx.val_set[index], index, validation=True).item() for index in range(batches)]
        mean = sum(losses) / max(len(losses), 1)
        ctx.accelerator.log({"loss/validation": mean}, step=state.global_step)
        logger.info("validation loss %.5f at step %d", mean, state.global_step)

    # ------------------------------------------------------------------ saving
    def _save_lora(self, ctx: "_LoopContext", file_name: str, *, final: bool = False) -> Path:
        """ss_epoch counts as sd-scripts: epochs completed at a step or epoch save, the run's epochs at the end."""
        path = ctx.save.output_dir / file_name
        metadata = ctx.metadata.for_save(epoch=ctx.max_epochs if final else ctx.state.epoch, steps=ctx.state.global_step)
        with self._evaluating(ctx):
            ctx.accelerator.unwrap_model(ctx.network).save_weights(str(path), ctx.save.dtype, metadata)
        logger.info("saved %s", path)
        return path

    def _save_state(self, ctx: "_LoopContext", folder_name: str) -> None:
        save_state_folder(ctx.save.output_dir / folder_name, ctx.state, ctx.accelerator.save_state,
                          is_main=ctx.accelerator.is_main_process, barrier=ctx.accelerator.wait_for_everyone)

    def _maybe_save_step(self, ctx: "_LoopContext") -> None:
        save, step = ctx.save, ctx.state.global_step
        if save.every_n_steps and step % save.every_n_steps == 0 and step < ctx.max_steps:
            self._periodic_save(ctx, step_file_name(save.output_name, step, save.ext), step_state_name(save.output_name, step),
                                lambda suffix: step_pattern(save.output_name, suffix),
                                save.last_n_steps and steps_keep_count(save.last_n_steps, save.every_n_steps),
                                save.last_n_steps_state and steps_keep_count(save.last_n_steps_state, save.every_n_steps))

    def _maybe_save_epoch(self, ctx: "_LoopContext") -> None:
        save, epoch = ctx.save, ctx.state.epoch
        if save.every_n_epochs and epoch % save.every_n_epochs == 0 and epoch < ctx.max_epochs:
            self._periodic_save(ctx, epoch_file_name(save.output_name, epoch, save.ext), epoch_state_name(save.output_name, epoch),
                                lambda suffix: epoch_pattern(save.output_name, suffix), save.last_n_epochs, save.last_n_epochs_state)

    def _periodic_save(self, ctx: "_LoopContext", file_name: str, state_name: str, pattern: Callable[[str], str],
                       keep_files: int | None, keep_states: int | None) -> None:
        """Save the LoRA (and the state with --save_state), then drop saves older than --save_last_n_*."""
        save, main = ctx.save, ctx.accelerator.is_main_process
        ctx.accelerator.wait_for_everyone()
        if main:
            self._save_lora(ctx, file_name)
            if keep_files:
                rotate(save.output_dir, pattern(save.ext), keep_files)
        if save.save_state:
            self._save_state(ctx, state_name)
            if keep_states and main:
                rotate(save.output_dir, pattern("-state"), keep_states)

    def _finish(self, ctx: "_LoopContext") -> Path | None:
        ctx.accelerator.wait_for_everyone()
        path = self._save_lora(ctx, ctx.save.output_name + ctx.save.ext, final=True) if ctx.accelerator.is_main_process else None
        if ctx.save.save_state or ctx.save.save_state_on_train_end:
            self._save_state(ctx, last_state_name(ctx.save.output_name))
        ctx.accelerator.end_training()
        return path

    # ------------------------------------------------------------------ sampling
    def _sample(self, ctx: "_LoopContext", *, epoch: int | None) -> None:
        if ctx.sample.prompts_file is None or not ctx.accelerator.is_main_process:
            return
        with self._evaluating(ctx), torch.no_grad(), ctx.accelerator.autocast():
            paths = self.sample_images(ctx.models, ctx.sample, step=ctx.state.global_step, epoch=epoch, device=ctx.accelerator.device)
        for path in paths:
            logger.info("sample image %s", path)

    # ------------------------------------------------------------------ checks
    def _check_cache_conflicts(self, args: argparse.Namespace, train_set: TrainDataset) -> None:
        problems = []
        if args.cache_latents:
            problems += latent_cache_conflicts(train_set.configs)
        if args.cache_text_encoder_outputs:
            problems += text_cache_conflicts(train_set.configs)
            if args.network_train_text_encoder_only:
                problems.append("--cache_text_encoder_outputs leaves nothing to train with --network_train_text_encoder_only")
        if problems:
            raise ValueError("; ".join(problems))


USER_ERRORS = (ValueError, OSError, TokenizerUnavailable, TrainingDiverged)
"""Expected problems (bad file, flag, dataset, diverged loss): one line, no traceback."""


def run_cli(trainer_class: type[NetworkTrainer], parser: argparse.ArgumentParser, argv: list[str] | None = None,
            resolve: Callable[[argparse.Namespace], argparse.Namespace] | None = None) -> None:
    """What every entry script's main() does: parse, set up logging, train, report expected errors in one line.
    `resolve` derives family-specific values from the parsed flags (it may raise a user error)."""
    args, notes = parse_flags(parser, argv)
    setup_logging(args)
    log_notes(notes)

    def run() -> None:
        resolved = resolve(args) if resolve else args
        trainer_class(resolved).train(resolved)

    exit_on_user_error(run, USER_ERRORS)


def enable_text_encoder_checkpointing(encoder: torch.nn.Module) -> None:
    """transformers 5 renamed gradient_checkpointing_enable (still there, deprecated); 4.x has only the old name."""
    if hasattr(encoder, "activation_checkpointing_enable"):
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_bucket_sizes(dataset: TrainDataset, multiple: int) -> None:
    """Every bucket must divide evenly through the VAE and the denoiser; say so before any image is encoded."""
    bad = sorted({reso for reso, _ in dataset.bucket_summary() if reso[0] % multiple or reso[1] % multiple})
    if bad:
        raise ValueError(f"buckets {', '.join(f'{w}x{h}' for w, h in bad)} are not multiples of {multiple} pixels, which "
                         f"this model needs; use a bucket_reso_steps (and resolution) that is a multiple of {multiple}")


def _report_dataset(train_set: TrainDataset) -> None:
    logger.info("%d training images, %d regularisation images, %d batches per epoch",
                train_set.num_train_images, train_set.num_reg_images, len(train_set))
    for reso, count in train_set.bucket_summary():
        logger.info("bucket %dx%d: %d images", reso[0], reso[1], count)
    if train_set.skipped_images:
        logger.warning("%d unreadable images were skipped", len(train_set.skipped_images))
    if len(train_set) == 0:
        raise ValueError("the dataset has no images; check image_dir / --train_data_dir")


@dataclass
class _LoopContext:
    """Everything the loop's pieces share; built once by _make_loop. `state` is the only part that changes."""

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
    validation: ValidationConfig
    metadata: RunMetadata
    lr_names: list[str]
    run: RunConfig
    max_steps: int
    max_epochs: int
    steps_per_epoch: int
    train_text_encoder: bool
    skip_data: bool  # resuming (or --skip_until_initial_step): skip the batches already trained on in this epoch
    network_models: NetworkModels  # the text encoder(s) and denoiser as the network module sees them
    state: TrainState


def _on_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _first(items: list) -> Any:
    return items[0]
