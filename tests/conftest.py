"""Shared test configuration: where ``../shared`` is, and small determinism settings."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
#: The shared research material (official fixtures, datasets); override with NLSR_SHARED.
SHARED = Path(os.environ.get("NLSR_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "official"
BENCHMARK = SHARED / "datasets" / "benchmark"
TRAIN_DATA = SHARED / "datasets" / "train"
REFERENCE = SHARED / "datasets" / "reference"


def require(path: Path) -> Path:
    """Skip the calling test, saying what is missing, unless ``path`` exists."""
    if not path.exists():
        pytest.skip(f"needs {path} (the shared research material, not part of the repo)")
    return path


def load_script(name: str) -> Iterator[ModuleType]:
    """Import ``scripts/<name>.py`` as a module (scripts are not a package), for a fixture to
    yield; it is removed from ``sys.modules`` afterwards."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture
def fixtures_dir() -> Path:
    return require(FIXTURES)


@pytest.fixture
def benchmark_dir() -> Path:
    return require(BENCHMARK)


@pytest.fixture(autouse=True)
def _no_shipped_weights(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    """Every test sees an empty weights folder unless it chooses one: the defaults of ``nlsr
    upscale`` / ``nlsr eval`` (bicubic without shipped weights) do not depend on what the
    package ships. ``test_pretrained`` sets its own folder or the packaged one."""
    from nlsr.models.pretrained import WEIGHTS_ENV

    folder = tmp_path_factory.mktemp("no_weights")
    monkeypatch.setenv(WEIGHTS_ENV, str(folder))


@pytest.fixture
def toy_root(tmp_path: Path) -> Path:
    """A tiny benchmark data root: Toy/HR with two small RGB images (test_evaluate has its own,
    with three and a non-image file)."""
    rng = np.random.default_rng(0)
    hr = tmp_path / "data" / "Toy" / "HR"
    hr.mkdir(parents=True)
    for name, (h, w) in (("a", (40, 48)), ("b", (36, 52))):
        ramp = np.linspace(0, 255, w)[None, :, None] * 0.7 + np.linspace(0, 80, h)[:, None, None]
        img = np.clip(ramp + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(hr / f"{name}.png")
    return tmp_path / "data"
