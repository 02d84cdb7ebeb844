"""The jobs of ``nlsr serve``: which models the page offers, one worker thread per model running
its queue one job at a time, tiles-done progress, and every file inside one temporary folder."""

from __future__ import annotations

import queue
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nlsr.atomic import atomic_write
from nlsr.io import Image, ImageReadError, read_image, write_image

#: Models offered when ``--model`` is not given: the shipped model and the bicubic baseline.
DEFAULT_MODELS = ("nlsr-dlsn-s", "bicubic")
#: The model that needs no weights; it upscales by any of these factors.
BICUBIC = "bicubic"
BICUBIC_SCALES = (2, 3, 4)
#: A job id: what :func:`secrets.token_hex` gives; anything else in a URL is not a job.
JOB_ID = re.compile(r"^[0-9a-f]{16}$")


class ServeError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: upload bytes, decoded pixels, jobs waiting, jobs kept."""

    max_upload: int = 64 * 2**20
    max_pixels: int = 16 * 2**20
    max_queue: int = 8
    keep: int = 16


@dataclass
class Job:
    """One upload: its options, state (queued, running, done, failed) and progress in tiles."""

    id: str
    name: str
    model: str
    scale: int
    precision: str
    tile: int
    size: tuple[int, int]
    state: str = "queued"
    tiles_done: int = 0
    tiles_total: int = 0
    message: str = ""
    seconds: float = 0.0
    created: float = field(default_factory=time.monotonic)
    image: Image | None = None


def resolve_models(names: list[str]) -> dict[str, tuple[int, ...]]:
    """Name -> scales for every model the page offers: shipped models (their shipped scales),
    ``bicubic`` (2, 3, 4) and architectures (the scales of their best shipped weights, under
    that shipped name). ValueError naming ``--model`` for anything else."""
    from nlsr.models.pretrained import default_model, read_manifest
    from nlsr.models.registry import available

    manifest = read_manifest()
    offered: dict[str, tuple[int, ...]] = {}
    for name in names:
        if name == BICUBIC:
            offered[name] = BICUBIC_SCALES
        elif name in manifest:
            offered[name] = tuple(sorted(manifest[name]))
        elif name in available():
            found = {default_model(scale, arch=name) for scale in BICUBIC_SCALES} - {None}
            if not found:
                raise ValueError(f"--model {name!r}: no shipped weights for this architecture")
            offered.update((n, tuple(sorted(manifest[n]))) for n in sorted(found))
        else:
            known = ", ".join([*manifest, BICUBIC])
            raise ValueError(f"--model {name!r}: unknown model; the page can offer {known}")
    return offered


class Jobs:
    """Every job of one server: submitted from request threads, run by one worker per model.

    Files live in one temporary folder (``folder``), named by job id only; :meth:`close`
    removes it."""

    def __init__(
        self,
        models: dict[str, tuple[int, ...]],
        limits: Limits,
        *,
        tile: int = 512,
        overlap: int = 16,
        device: str | None = None,
    ) -> None:
        self.models, self.limits, self.tile, self.overlap = models, limits, tile, overlap
        self.device = device
        self.folder = Path(tempfile.mkdtemp(prefix="nlsr-serve-"))
        self._jobs: dict[str, Job] = {}
        self._pending: dict[str, list[str]] = {m: [] for m in models}
        self._queues: dict[str, queue.Queue[str | None]] = {}
        self._workers: list[threading.Thread] = []
        self._loaded: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()

    # -- requests -----------------------------------------------------------------------------

    def submit(self, data: bytes, name: str, model: str, scale: int, precision: str) -> Job:
        """Check the options, decode ``data`` (size limit checked on the header first) and
        queue the job; ServeError with the message the CLI would print for a bad file."""
        from nlsr.inference import PRECISIONS

        if model not in self.models:
            raise ServeError(f"model {model!r}: not offered; choose {', '.join(self.models)}")
        if scale not in self.models[model]:
            scales = ", ".join(f"x{s}" for s in self.models[model])
            raise ServeError(f"model {model} upscales {scales}, not x{scale}")
        if precision not in PRECISIONS:
            raise ServeError(f"precision {precision!r}: choose {', '.join(PRECISIONS)}")
        if not data:
            raise ServeError(f"{name}: empty file (0 bytes)")
        with self._lock:
            if sum(len(p) for p in self._pending.values()) >= self.limits.max_queue:
                raise ServeError(
                    f"{self.limits.max_queue} jobs are waiting already; try again later", 503
                )
        job_id = secrets.token_hex(8)
        upload = atomic_write(self.folder / f"{job_id}.upload", data)
        try:
            image = read_image(upload, max_pixels=self.limits.max_pixels)
        except ImageReadError as e:
            raise ServeError(str(e).replace(str(upload), name, 1)) from None
        finally:
            upload.unlink(missing_ok=True)
        height, width = image.pixels.shape[:2]
        write_image(self.path(job_id, "input"), image)
        job = Job(job_id, name, model, scale, precision, self.tile, (width, height), image=image)
        from nlsr.inference import tile_count

        job.tiles_total = tile_count(height, width, self.tile, self.overlap)
        with self._lock:
            self._jobs[job_id] = job
            self._pending[model].append(job_id)
            self._prune()
            self._worker(model).put(job_id)
        return job

    def get(self, job_id: str) -> Job:
        """The job of that id (ServeError 404 for anything else, also malformed ids)."""
        with self._lock:
            job = self._jobs.get(job_id) if JOB_ID.match(job_id) else None
        if job is None:
            raise ServeError("no such job (finished jobs are kept for a while only)", 404)
        return job

    def status(self, job: Job) -> dict[str, Any]:
        """What the page polls: state, queue position (1 = next), tiles, message, sizes."""
        with self._lock:
            pending = self._pending[job.model]
            position = pending.index(job.id) + 1 if job.id in pending else 0
            width, height = job.size
            return {
                "id": job.id,
                "name": job.name,
                "model": job.model,
                "scale": job.scale,
                "precision": job.precision,
                "tile": job.tile,
                "overlap": self.overlap,
                "state": job.state,
                "position": position,
                "tiles_done": job.tiles_done,
                "tiles_total": job.tiles_total,
                "message": job.message,
                "seconds": round(job.seconds, 3),
                "input": [width, height],
                "output": [width * job.scale, height * job.scale],
            }

    def path(self, job_id: str, kind: str) -> Path:
        """The file of a job: ``input`` (the decoded upload as PNG) or ``result``."""
        return self.folder / f"{job_id}-{kind}.png"

    def close(self) -> None:
        """Stop the workers after their current job and remove the temporary folder."""
        with self._lock:
            queues = list(self._queues.values())
        for q in queues:
            q.put(None)
        for worker in self._workers:
            worker.join(timeout=5)
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- workers ------------------------------------------------------------------------------

    def _worker(self, model: str) -> queue.Queue[str | None]:
        """The queue of ``model``'s worker, started on first use (call under the lock)."""
        if model not in self._queues:
            self._queues[model] = queue.Queue()
            worker = threading.Thread(
                target=self._work, args=(model,), name=f"nlsr-serve-{model}", daemon=True
            )
            self._workers.append(worker)
            worker.start()
        return self._queues[model]

    def _work(self, model: str) -> None:
        jobs = self._queues[model]
        while (job_id := jobs.get()) is not None:
            with self._lock:
                job = self._jobs.get(job_id)
                if job_id in self._pending[model]:
                    self._pending[model].remove(job_id)
                if job is not None:
                    job.state = "running"
            if job is not None:
                self._run(job)

    def _run(self, job: Job) -> None:
        from nlsr.cli import describe_error
        from nlsr.inference import upscale

        start = time.perf_counter()
        try:
            described = self._model(job.model, job.scale)

            def count(done: int, total: int) -> None:
                job.tiles_done, job.tiles_total = done, total

            assert job.image is not None
            result = upscale(
                described,
                job.image,
                tile=self.tile,
                overlap=self.overlap,
                precision=job.precision,
                on_progress=count,
            )
            write_image(self.path(job.id, "result"), result)
            job.state = "done"
        except Exception as e:  # reported on the page, as the CLI would print it
            job.state, job.message = "failed", describe_error(e)[1]
        finally:
            job.image = None
            job.seconds = time.perf_counter() - start

    def _model(self, name: str, scale: int) -> Any:
        """The model's descriptor, resolved once per (name, scale) and kept."""
        if (name, scale) not in self._loaded:
            from nlsr.inference import select_device
            from nlsr.models.resolve import resolve_model

            described = resolve_model(name, scale, pretrained=name != BICUBIC)
            described.module.eval().to(select_device(self.device))
            self._loaded[name, scale] = described
        return self._loaded[name, scale]

    def _prune(self) -> None:
        """Forget the oldest finished jobs beyond ``limits.keep`` and delete their files."""
        finished = [j for j in self._jobs.values() if j.state in ("done", "failed")]
        for job in sorted(finished, key=lambda j: j.created)[
            : max(0, len(finished) - self.limits.keep)
        ]:
            del self._jobs[job.id]
            for kind in ("input", "result"):
                self.path(job.id, kind).unlink(missing_ok=True)
