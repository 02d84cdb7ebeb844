"""The training loop: L1 + Adam + step schedule, EMA, validation, exact resume, DDP, export.

Files in the run folder:
``config.yaml`` (resolved config, read by ``--resume``), ``checkpoint.pt`` (latest training
state, replaced atomically), ``log.jsonl`` (one JSON record per log/validation event),
``final.safetensors`` / ``best.safetensors`` / ``ema.safetensors`` (nlsr-format weights with
training provenance), ``tb/`` (TensorBoard, when it is installed).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import signal
import subprocess
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

from nlsr.atomic import atomic_write
from nlsr.train import distributed as D
from nlsr.train.config import ConfigError, TrainConfig, parse_config, read_config_file, save_config
from nlsr.train.config import apply_overrides as _apply_overrides
from nlsr.train.data import LoadReport, PatchDataset, StepBatchSampler, TrainImages
from nlsr.train.state import (
    ResumeError,
    capture_rng,
    load_checkpoint,
    load_scheduler_state,
    restore_rng,
    save_checkpoint,
    scheduler_state,
)

log = logging.getLogger("nlsr.train")

CONFIG_FILE = "config.yaml"
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"
#: prefix of the upsampler's tensors, re-initialised when fine-tuning to another scale
UPSAMPLER_PREFIX = "tail.0."


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


class ModelEMA:
    """Exponential moving average of a model's weights (buffers are copied as they are)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def decay_at(self, updates: int) -> float:
        """The decay used for update number ``updates`` (1-based): warmed up as
        ``min(decay, (1 + n) / (10 + n))`` so the initial weights fade out quickly."""
        return min(self.decay, (1.0 + updates) / (10.0 + updates))

    @torch.no_grad()
    def update(self, model: nn.Module, updates: int) -> None:
        """``ema = d * ema + (1 - d) * weights`` for every floating tensor, ``d = decay_at``."""
        decay = self.decay_at(updates)
        for e, p in zip(self.module.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1.0 - decay)
        for e, b in zip(self.module.buffers(), model.buffers(), strict=True):
            e.copy_(b)


def git_commit() -> str | None:
    """The commit of the nlsr source tree, or None when it is not a git checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def resume_config(run_dir: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> TrainConfig:
    """The configuration saved in ``run_dir`` with optional ``key=value`` overrides applied
    (e.g. ``train.iterations=...`` to extend a finished run)."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ResumeError(f"{run_dir}: not a run folder (no {CONFIG_FILE}); start it with --config")
    if not (run_dir / CHECKPOINT_FILE).is_file():
        raise ResumeError(f"{run_dir}: no {CHECKPOINT_FILE} yet, nothing to resume")
    raw = _apply_overrides(read_config_file(path), overrides)
    raw["run_dir"] = str(run_dir.resolve())
    return parse_config(raw, source=str(path))


def _read_state_dict(path: str, key: str) -> dict[str, torch.Tensor]:
    from nlsr.checkpoint import read_state_dict

    if not Path(path).is_file():
        raise ConfigError(f"{key}: file {path} does not exist")
    state, _ = read_state_dict(path)
    return state


def _load_initial_weights(model: nn.Module, cfg: TrainConfig) -> None:
    """Apply ``train.warm_start`` (every tensor, strict) or ``train.finetune_from`` (every
    tensor but the upsampler ``tail.0``, which depends on the scale)."""
    t = cfg.train
    if t.warm_start is not None:
        state = _read_state_dict(t.warm_start, "train.warm_start")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ConfigError(
                f"train.warm_start: {t.warm_start} does not fit {cfg.model.arch}: {exc}"
            ) from exc
        log.info("warm start from %s", t.warm_start)
    elif t.finetune_from is not None:
        state = _read_state_dict(t.finetune_from, "train.finetune_from")
        state = {k: v for k, v in state.items() if not k.startswith(UPSAMPLER_PREFIX)}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise ConfigError(
                f"train.finetune_from: {t.finetune_from} does not fit: {exc}"
            ) from exc
        missing = [k for k in missing if not k.startswith(UPSAMPLER_PREFIX)]
        if missing or unexpected:
            raise ConfigError(
                f"train.finetune_from: {t.finetune_from} does not fit {cfg.model.arch}: "
                f"missing {missing}, unexpected {unexpected}"
            )
        log.info(
            "fine-tuning from %s (upsampler %s* re-initialised)", t.finetune_from, UPSAMPLER_PREFIX
        )


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
    """One training run; :meth:`run` trains to ``train.iterations`` or until interrupted."""

    def __init__(self, config: TrainConfig, *, resume: bool = False) -> None:
        self.cfg = config
        self.resume = resume
        self.run_dir = Path(config.run_dir or ".")
        self.stop_signal: int | None = None
        self.step = 0
        self.best_psnr: float | None = None
        self.best_step: int | None = None
        self.best_path: Path | None = None

    # ------------------------------------------------------------------ setup

    def _prepare_run_dir(self) -> None:
        ckpt = self.run_dir / CHECKPOINT_FILE
        if self.resume:
            if not ckpt.is_file():
                raise ResumeError(f"{self.run_dir}: no {CHECKPOINT_FILE} to resume from")
        elif ckpt.exists():
            raise ConfigError(
                f"run_dir: {self.run_dir} already holds a run; continue it with "
                f"`nlsr train --resume {self.run_dir}` or choose another run_dir"
            )
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / CONFIG_FILE)
        D.barrier(self.dist)

    def _build_model(self) -> None:
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
        if not self.resume:  # a resumed run takes every weight from its checkpoint
            _load_initial_weights(model, self.cfg)
        model.to(self.device)
        if self.cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()
        self.model = model
        self.ema = ModelEMA(model, self.cfg.optim.ema) if self.cfg.optim.ema is not None else None
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net: nn.Module = DistributedDataParallel(model, device_ids=ids)
        else:
            self.net = model
        if self.dist.rank:
            torch.manual_seed(seed + self.dist.rank)  # each rank its own stream (hashing attention)
        o = self.cfg.optim
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=o.lr, betas=o.betas, eps=o.eps)
        if o.schedule == "cosine":
            self.scheduler: torch.optim.lr_scheduler.LRScheduler = (
                torch.optim.lr_scheduler.CosineAnnealingLR(
                    self.optimizer, self.cfg.train.iterations, o.min_lr
                )
            )
        else:
            self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
                self.optimizer, o.milestones, o.gamma
            )

    def _load_data(self) -> None:
        d = self.cfg.data
        cache_dir = self.run_dir / "data_cache" / f"rank{self.dist.rank}"
        self.images = TrainImages(
            d,
            self.cfg.model.scale,
            self.cfg.train.seed,
            cache_dir=cache_dir,
            threads=max(1, d.workers),
        )
        r = self.images.report
        log.info(
            "training images: %d used of %d found (%d unreadable, %d too small, %d without LR)",
            r.used,
            r.found,
            len(r.unreadable),
            len(r.too_small),
            len(r.unpaired),
        )

    def _prepare_validation(self) -> None:
        """Check that the validation sets exist before training starts (rank 0 validates)."""
        v = self.cfg.val
        if v.every == 0 or not self.dist.is_main:
            return
        from nlsr.data import benchmark_images

        for name in v.sets:
            benchmark_images(name, v.data_root)

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
        if self.dist.is_main:
            self._prune_log()
        log.info("resumed %s at step %d", self.run_dir, self.step)

    def _prune_log(self) -> None:
        path = self.run_dir / LOG_FILE
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                if json.loads(line).get("step", 0) <= self.step:
                    kept.append(line + "\n")
        atomic_write(path, lambda fh: fh.write("".join(kept).encode("utf-8")))

    # ------------------------------------------------------------------ pieces of a step

    def _record(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.run_dir / LOG_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            scalars = {
                k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"
            }
            for name, scores in record.get("sets", {}).items():
                scalars.update({f"{name}/{metric}": value for metric, value in scores.items()})
            for key, value in scalars.items():
                self.tb.add_scalar(f"{record['event']}/{key}", value, record["step"])

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
            from nlsr.evaluation import evaluate

            module = self.ema.module if self.ema is not None else self.model
            devices = [self.device.index or 0] if self.device.type == "cuda" else []
            v, d = self.cfg.val, self.cfg.data
            scores: dict[str, dict[str, float]] = {}
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                module.eval()
                try:
                    for name in v.sets:
                        res = evaluate(
                            module,
                            name,
                            self.cfg.model.scale,
                            degradation=d.degradation,
                            noise_sigma=d.noise_sigma,
                            data_root=v.data_root,
                            max_images=v.max_images,
                            device=self.device,
                        )
                        scores[name] = {"psnr": float(res.psnr), "ssim": float(res.ssim)}
                finally:
                    if self.ema is None:
                        module.train()
            mean = sum(s["psnr"] for s in scores.values()) / len(scores)
            improved = self.best_psnr is None or mean > self.best_psnr
            if improved:
                self.best_psnr, self.best_step = mean, self.step
                self.best_path = self._export(module, "best")
            self._record(
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

    def _provenance(self, weights: str) -> dict[str, Any]:
        from nlsr import __version__

        r = self.images.report
        return {
            "training": {
                "weights": weights,
                "iterations": self.step,
                "config": self.cfg.to_dict(),
                "data": {
                    "train_dirs": self.cfg.data.train_dirs,
                    "images_used": r.used,
                    "images_found": r.found,
                    "degradation": self.cfg.data.degradation,
                    "noise_sigma": self.cfg.data.noise_sigma,
                },
                "best": {
                    "mean_psnr": self.best_psnr,
                    "step": self.best_step,
                    "sets": self.cfg.val.sets,
                },
                "git_commit": self.commit,
                "nlsr_version": __version__,
                "torch_version": torch.__version__,
            }
        }

    def _export(self, module: nn.Module, name: str) -> Path:
        from nlsr.checkpoint import save

        return save(module, self.run_dir / f"{name}.safetensors", metadata=self._provenance(name))

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
        """Set up, train (resuming if asked), validate, checkpoint, export; see the module doc."""
        cfg = self.cfg
        self.dist = D.setup(cfg.train.device)
        self.device = self.dist.device
        self.use_amp = cfg.train.amp and self.device.type in ("cuda", "cpu")
        self.commit = git_commit()
        self.tb = None
        self.bar: tqdm | None = None
        handlers: dict[int, Any] = {}
        try:
            with _torch_settings(cfg, self.device):
                self._prepare_run_dir()
                self._load_data()
                self._build_model()
                self._prepare_validation()
                if self.resume:
                    self._restore()
                if self.dist.is_main:
                    with contextlib.suppress(ImportError):
                        from torch.utils.tensorboard import SummaryWriter

                        self.tb = SummaryWriter(str(self.run_dir / "tb"))
                if threading.current_thread() is threading.main_thread():
                    for sig in (signal.SIGINT, signal.SIGTERM):
                        handlers[sig] = signal.signal(sig, self._on_signal)
                interrupted = self._loop()
                return self._finish(interrupted)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if self.bar is not None:
                self.bar.close()
            if self.tb is not None:
                self.tb.close()
            D.teardown(self.dist)

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
            self._record(
                {
                    "event": "start",
                    "step": start,
                    "world_size": self.dist.world_size,
                    "device": str(self.device),
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
                self._record(
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
            self._record(
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
    """Train ``config`` (or continue the run in ``config.run_dir`` when ``resume``)."""
    return Trainer(config, resume=resume).run()
