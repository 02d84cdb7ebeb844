"""The training loop: L1 + Adam + step schedule, EMA, validation, exact resume, DDP, export.

Files in the run folder (names in :mod:`nlsr.train.rundir`):
``config.yaml`` (resolved config, read by ``--resume``), ``checkpoint.pt`` (latest training
state, replaced atomically), ``log.jsonl`` (one JSON record per log/validation event),
``final.safetensors`` / ``best.safetensors`` / ``ema.safetensors`` (nlsr-format weights with
training provenance), ``tb/`` (TensorBoard, when it is installed).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from nlsr.inference import native_bf16
from nlsr.train import distributed as D
from nlsr.train.config import ConfigError, TrainConfig
from nlsr.train.data import LoadReport, PatchDataset, StepBatchSampler, TrainImages
from nlsr.train.ema import ModelEMA
from nlsr.train.events import EventLog
from nlsr.train.rundir import CHECKPOINT_FILE, prepare_run_dir, stopped_error
from nlsr.train.state import (
    ResumeError,
    capture_rng,
    load_checkpoint,
    load_scheduler_state,
    restore_rng,
    save_checkpoint,
    scheduler_state,
)
from nlsr.train.validation import check_val_sets, score_val_sets
from nlsr.train.weights import git_commit, load_initial_weights, provenance

log = logging.getLogger("nlsr.train")


@dataclass
class TrainResult:
    """What a call to :func:`train` produced."""

    run_dir: Path
    step: int
    interrupted: bool
    final: Path | None
    best: Path | None
    ema: Path | None
    best_psnr: float | None
    data: LoadReport


@contextlib.contextmanager
def _torch_settings(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
    """Apply threads / determinism flags for the run and restore the previous ones after."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    prev_cudnn_det = torch.backends.cudnn.deterministic
    try:
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.set_num_threads(prev_threads)
        if torch.are_deterministic_algorithms_enabled() != prev_det:  # the call is costly
            torch.use_deterministic_algorithms(prev_det)
        torch.backends.cudnn.benchmark = prev_bench
        torch.backends.cudnn.deterministic = prev_cudnn_det


def _ignore_stop_signals(_worker_id: int) -> None:
    # Ctrl-C and SIGTERM (which ``timeout`` and schedulers send to the whole process group) are
    # handled by the main process, which saves a checkpoint; the workers must outlive it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Trainer:
    """One training run, set up whole by the constructor (run folder, data, model, EMA,
    optimizer, schedule, the checkpoint's state when resuming); :meth:`run` trains to
    ``train.iterations`` or until interrupted, :meth:`close` releases the progress bar and
    TensorBoard. :func:`train` wraps it in the process group and the torch settings."""

    def __init__(self, config: TrainConfig, dist: D.DistInfo, *, resume: bool = False) -> None:
        self.cfg = config
        self.resume = resume
        self.dist = dist
        self.device = dist.device
        amp = config.train.amp
        # bf16 autocast: on CUDA and the CPU only; by default where bf16 is native (faster)
        self.use_amp = self.device.type in ("cuda", "cpu") and (
            native_bf16(self.device) if amp is None else amp
        )
        self.commit = git_commit()
        self.run_dir = Path(config.run_dir or ".")
        self.stop_signal: int | None = None
        self.step = 0
        self.best_psnr: float | None = None
        self.best_step: int | None = None
        self.best_path: Path | None = None
        self.bar: tqdm | None = None  # made when the loop starts: none for a completed run
        prepare_run_dir(config, self.run_dir, resume=resume, write=dist.is_main)
        D.barrier(dist)
        self.events = EventLog(self.run_dir, enabled=dist.is_main)
        self.images = self._load_images()
        self.model = self._build_model()
        self.ema = ModelEMA(self.model, config.optim.ema) if config.optim.ema is not None else None
        self.net = self._wrap(self.model)
        if dist.rank:  # each rank its own stream (hashing attention)
            torch.manual_seed(config.train.seed + dist.rank)
        o = config.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=o.lr, betas=o.betas, eps=o.eps)
        self.scheduler = self._schedule(self.optimizer)
        if dist.is_main:
            check_val_sets(config)
        if resume:
            self._restore()
        self.events.open_tensorboard()

    # ------------------------------------------------------------------ setup

    def _load_images(self) -> TrainImages:
        d = self.cfg.data
        images = TrainImages(
            d,
            self.cfg.model.scale,
            self.cfg.train.seed,
            cache_dir=self.run_dir / "data_cache" / f"rank{self.dist.rank}",
            threads=max(1, d.workers),
        )
        r = images.report
        log.info(
            "training images: %d used of %d found (%d unreadable, %d too small, %d without LR)",
            r.used,
            r.found,
            len(r.unreadable),
            len(r.too_small),
            len(r.unpaired),
        )
        return images

    def _build_model(self) -> nn.Module:
        """The network, seeded with ``train.seed``, its initial weights loaded (a resumed run
        takes every weight from its checkpoint), on the device, in training mode."""
        from nlsr.models import create

        m = self.cfg.model
        seed = self.cfg.train.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            model = create(m.arch, m.scale, **m.options)
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(
                f"model: cannot build {m.arch} x{m.scale} with options {m.options}: {exc}"
            ) from exc
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"model.arch: {m.arch} has no trainable parameters")
        if not self.resume:
            load_initial_weights(model, self.cfg)
        model.to(self.device)
        if self.cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()
        return model

    def _wrap(self, model: nn.Module) -> nn.Module:
        """What the steps call: the model itself, or DistributedDataParallel around it."""
        if not self.dist.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def _schedule(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        o = self.cfg.optim
        if o.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, self.cfg.train.iterations, o.min_lr
            )
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, o.milestones, o.gamma)

    def _restore(self) -> None:
        state = load_checkpoint(self.run_dir / CHECKPOINT_FILE)
        if self.ema is not None and state["ema"] is None:
            raise ResumeError(f"{self.run_dir}: the checkpoint has no EMA but optim.ema is set")
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None:
                self.ema.module.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as exc:
            raise ResumeError(
                f"{self.run_dir / CHECKPOINT_FILE}: does not fit this configuration: {exc}"
            ) from exc
        load_scheduler_state(self.scheduler, state["scheduler"])
        self.step = int(state["step"])
        sampler = {"seed": self.cfg.train.seed, "batch_size": self.cfg.data.batch_size}
        if any(state["sampler"][k] != v for k, v in sampler.items()):
            log.warning(
                "train.seed / data.batch_size differ from the checkpoint's %s: the data order "
                "from step %d on is not the one the run started with",
                {k: state["sampler"][k] for k in sampler},
                self.step,
            )
        self.best_psnr = state["best"]["psnr"]
        self.best_step = state["best"]["step"]
        best = self.run_dir / "best.safetensors"
        self.best_path = best if best.is_file() else None
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            restore_rng(rngs[self.dist.rank])
        else:
            log.warning(
                "checkpoint was written by %d processes, resuming with %d: RNG streams re-seeded",
                len(rngs),
                self.dist.world_size,
            )
            torch.manual_seed(self.cfg.train.seed + 7919 * self.step + self.dist.rank)
        self.events.prune(self.step)
        log.info("resumed %s at step %d", self.run_dir, self.step)

    # ------------------------------------------------------------------ pieces of a step

    def _train_step(self, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        dev = self.device
        fmt = torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format
        lr = lr.to(dev, non_blocking=True).contiguous(memory_format=fmt)
        hr = hr.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.use_amp):
            sr = self.net(lr)
        loss = F.l1_loss(sr.float(), hr)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, self.step + 1)
        return loss.detach()

    def _validate(self) -> None:
        """Rank 0 scores the EMA weights (or the model) on every val set; tracks the best."""
        if self.dist.is_main:
            module = self.ema.module if self.ema is not None else self.model
            scores = score_val_sets(module, self.cfg, self.device)
            mean = sum(s["psnr"] for s in scores.values()) / len(scores)
            improved = self.best_psnr is None or mean > self.best_psnr
            if improved:
                self.best_psnr, self.best_step = mean, self.step
                self.best_path = self._export(module, "best")
            self.events.record(
                {
                    "event": "val",
                    "step": self.step,
                    "weights": "model" if self.ema is None else "ema",
                    "mean_psnr": mean,
                    "best": improved,
                    "sets": scores,
                }
            )
            text = ", ".join(f"{k} {s['psnr']:.3f} dB / {s['ssim']:.4f}" for k, s in scores.items())
            self._write(f"step {self.step}: validation {text}{' (best)' if improved else ''}")
        D.barrier(self.dist)

    def _save(self) -> None:
        rngs = D.gather(capture_rng(), self.dist)
        if self.dist.is_main:
            state = {
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": scheduler_state(self.scheduler),
                "ema": self.ema.module.state_dict() if self.ema is not None else None,
                "rng": rngs,
                "sampler": {
                    "seed": self.cfg.train.seed,
                    "step": self.step,
                    "batch_size": self.cfg.data.batch_size,
                },
                "best": {"psnr": self.best_psnr, "step": self.best_step},
                "world_size": self.dist.world_size,
                "config": self.cfg.to_dict(),
            }
            save_checkpoint(state, self.run_dir / CHECKPOINT_FILE)
        D.barrier(self.dist)

    def _export(self, module: nn.Module, name: str) -> Path:
        from nlsr.checkpoint import save_state

        metadata = provenance(
            self.cfg,
            weights=name,
            step=self.step,
            data=self.images.report,
            best_psnr=self.best_psnr,
            best_step=self.best_step,
            commit=self.commit,
        )
        m = self.cfg.model
        path = self.run_dir / f"{name}.safetensors"
        return save_state(
            module.state_dict(),
            path,
            arch=m.arch,
            scale=m.scale,
            options=m.options,
            metadata=metadata,
        )

    def _write(self, text: str) -> None:
        if self.dist.is_main:
            if self.bar is not None and not self.bar.disable:
                self.bar.write(text)
            else:
                log.info(text)

    # ------------------------------------------------------------------ run

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.stop_signal is not None:
            raise KeyboardInterrupt  # second signal: stop now, the last checkpoint stays
        self.stop_signal = signum

    def run(self) -> TrainResult:
        """Train from the current step (validating, checkpointing), then export; SIGINT and
        SIGTERM stop it at the end of a step with a checkpoint; see the module doc."""
        handlers: dict[int, Any] = {}
        try:
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    handlers[sig] = signal.signal(sig, self._on_signal)
            interrupted = self._loop()
            return self._finish(interrupted)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def close(self) -> None:
        """Close the progress bar and the TensorBoard writer, and release DistributedDataParallel
        while the process group is alive (a Gloo group freed later can hang in its destructor)."""
        self.net = self.model
        if self.bar is not None:
            self.bar.close()
        self.events.close()

    def _loop(self) -> bool:
        cfg, t = self.cfg, self.cfg.train
        start = self.step
        if start >= t.iterations:
            log.info(
                "the run is complete (step %d of %d); raise train.iterations to go on",
                start,
                t.iterations,
            )
            return False
        d = cfg.data
        sampler = StepBatchSampler(
            self.images.lr_sizes(),
            d.batch_size,
            self.images.lr_patch,
            t.seed,
            augment=d.augment,
            start=start,
            end=t.iterations,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        loader = DataLoader(
            PatchDataset(self.images),
            batch_sampler=sampler,
            num_workers=d.workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_ignore_stop_signals if d.workers else None,
            prefetch_factor=4 if d.workers else None,
            # Its own generator: iterating a DataLoader draws a base seed, which would otherwise
            # come from the global RNG that the hashing blocks draw from (and break exact resume).
            generator=torch.Generator().manual_seed(t.seed),
        )
        self.bar = tqdm(
            total=t.iterations,
            initial=start,
            unit="it",
            dynamic_ncols=True,
            disable=None if self.dist.is_main else True,
            desc=f"{cfg.model.arch} x{cfg.model.scale}",
        )
        if self.dist.is_main:
            self.events.record(
                {
                    "event": "start",
                    "step": start,
                    "world_size": self.dist.world_size,
                    "device": str(self.device),
                    "amp": self.use_amp,
                    "channels_last": self.cfg.train.channels_last,
                    "images": self.images.report.used,
                }
            )
        window_loss = torch.zeros((), device=self.device)
        window_steps, window_start = 0, time.perf_counter()
        for lr, hr in loader:
            loss = self._train_step(lr, hr)
            self.step += 1
            window_loss += loss
            window_steps += 1
            self.bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.iterations:
                mean_loss = float(D.all_mean(window_loss, self.dist)) / window_steps
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(
                        f"training diverged: loss {mean_loss} at step {self.step}; the last good "
                        f"checkpoint is {self.run_dir / CHECKPOINT_FILE}"
                    )
                speed = window_steps / max(time.perf_counter() - window_start, 1e-9)
                lr_now = self.scheduler.get_last_lr()[0]
                self.events.record(
                    {
                        "event": "train",
                        "step": self.step,
                        "loss": mean_loss,
                        "lr": lr_now,
                        "it_per_s": speed,
                    }
                )
                self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr_now:.2e}")
                if self.bar.disable:
                    eta = (t.iterations - self.step) / speed
                    self._write(
                        f"step {self.step}/{t.iterations} loss {mean_loss:.5f} lr {lr_now:.2e} "
                        f"{speed:.2f} it/s ETA {eta / 60:.1f} min"
                    )
                window_loss.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if cfg.val.every and (self.step % cfg.val.every == 0 or self.step == t.iterations):
                self._validate()
                window_start = time.perf_counter()
            if self.step % t.checkpoint_every == 0 or self.step == t.iterations:
                self._save()
            if D.any_rank(self.stop_signal is not None, self.dist):
                if self.step % t.checkpoint_every and self.step != t.iterations:
                    self._save()
                name = (
                    signal.Signals(self.stop_signal).name
                    if self.stop_signal
                    else "a signal on another rank"
                )
                self._write(
                    f"stopped by {name} at step {self.step}; checkpoint saved, continue with "
                    f"`nlsr train --resume {self.run_dir}`"
                )
                return True
        return False

    def _finish(self, interrupted: bool) -> TrainResult:
        final = ema = None
        if not interrupted and self.dist.is_main:
            final = self._export(self.model, "final")
            if self.ema is not None:
                ema = self._export(self.ema.module, "ema")
            self.events.record(
                {
                    "event": "end",
                    "step": self.step,
                    "best_mean_psnr": self.best_psnr,
                    "best_step": self.best_step,
                }
            )
        D.barrier(self.dist)
        return TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            interrupted=interrupted,
            final=final,
            best=self.best_path,
            ema=ema,
            best_psnr=self.best_psnr,
            data=self.images.report,
        )


def train(config: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Train ``config`` (or continue the run in ``config.run_dir`` when ``resume``).

    An OSError that ends the run (a full disk...) is raised again with what became of the run:
    whether the last checkpoint is intact, and how to continue it."""
    try:
        return _train(config, resume)
    except OSError as exc:
        raise stopped_error(exc, Path(config.run_dir or ".")) from exc


def _train(config: TrainConfig, resume: bool) -> TrainResult:
    dist = D.setup(config.train.device)
    try:
        with _torch_settings(config, dist.device):
            trainer = Trainer(config, dist, resume=resume)
            try:
                return trainer.run()
            finally:
                trainer.close()
    finally:
        D.teardown(dist)
