"""Checkpoints that cannot hurt: mutated headers, tensors and bytes (seeded, reproducible) let
nothing but ``CheckpointError`` out of ``nlsr.load``, and a header asking for a gigantic model is
refused quickly without allocating it.

Every fuzz test reports the failing case's number and description; rerun one case by setting
``FUZZ_ONLY=<number>`` (the cases are generated from a fixed seed)."""

from __future__ import annotations

import io
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as st_save

import nlsr
from nlsr.checkpoint import CheckpointError

SEED = 20240613
#: Cases per fuzz test; three tests, a few hundred cases in all.
CASES = int(os.environ.get("FUZZ_CASES", "120"))
ONLY = os.environ.get("FUZZ_ONLY")

#: Small networks whose state dicts are mutated (fast to build; one has bool buffers).
BASES: dict[str, dict[str, Any]] = {
    "edsr": {"n_resblocks": 2, "n_feats": 8},
    "rcan": {"n_resgroups": 1, "n_resblocks": 1, "n_feats": 8, "reduction": 4},
    "lcoan": {"n_resgroups": 1, "n_resblocks": 1, "n_feats": 8, "n_clusters": 4},
}

#: Values of every wrong (and some right) type and range for header options and scales.
VALUES: list[Any] = [
    -5,
    -1,
    0,
    1,
    2,
    3,
    7,
    10**5,
    10**6,
    2**31,
    2**63,
    10**40,
    10**400,
    0.5,
    -0.0,
    3.5,
    1e308,
    float("inf"),
    float("-inf"),
    float("nan"),
    "64",
    "abc",
    "",
    "none",
    "ema",
    "gla",
    "nla",
    True,
    False,
    None,
    [],
    [1, 2],
    {},
    {"a": 1},
    {"reduction": 0},
    {"k_size": 10**4},
    {"chunk_size": "x"},
]
OPTION_NAMES = sorted({k for arch in nlsr.models.available() for k in nlsr.models.options(arch)})
DTYPES = [
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.complex64,
]


def _state(arch: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nlsr.models.create(arch, 2, **BASES[arch])
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


STATES = {arch: _state(arch) for arch in BASES}


def _nlsr_file(tensors: dict[str, torch.Tensor], config: Any, raw: str | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(config)
    return st_save(tensors, metadata={"nlsr_config": text, "format": "pt"})


def _pt_bytes(obj: Any, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def _check(path: Path, what: str, failures: list[str], **kwargs: Any) -> None:
    """Load ``path``: a model with finite float32 weights, or a CheckpointError; else a failure."""
    try:
        model = nlsr.load(path, **kwargs)
    except CheckpointError as e:
        assert str(e), what
        return
    except Exception as e:
        failures.append(f"{what}: {type(e).__name__}: {str(e)[:300]}")
        return
    for key, t in model.state_dict().items():
        if t.is_floating_point() and (t.dtype != torch.float32 or not torch.isfinite(t).all()):
            failures.append(f"{what}: loaded with {key} {t.dtype}, non-finite or not float32")
            return


def _run(tmp_path: Path, make: Callable[[random.Random, int], tuple[str, bytes, dict]]) -> None:
    failures: list[str] = []
    for i in range(CASES):
        if ONLY is not None and str(i) != ONLY:
            continue
        rng = random.Random(f"{SEED}-{make.__name__}-{i}")
        what, data, kwargs = make(rng, i)
        path = tmp_path / f"case{i}.bin"
        path.write_bytes(data)
        _check(path, f"case {i} ({what})", failures, **kwargs)
        path.unlink()
    assert not failures, "\n".join(failures[:10])


# --------------------------------------------------------------------------- headers


def _header_case(rng: random.Random, i: int) -> tuple[str, bytes, dict]:
    arch = rng.choice(sorted(BASES))
    tensors = STATES[arch]
    config: dict[str, Any] = {"arch": arch, "scale": 2, "options": dict(BASES[arch])}
    kind = rng.choice(["option", "option", "option", "several", "scale", "arch", "shape", "raw"])
    if kind == "option":
        key = rng.choice([*OPTION_NAMES, *BASES[arch], "bogus"])
        value = rng.choice(VALUES)
        config["options"][key] = value
        what = f"{arch} header option {key}={value!r}"
    elif kind == "several":
        picks = {rng.choice(OPTION_NAMES): rng.choice(VALUES) for _ in range(rng.randint(2, 4))}
        config["options"].update(picks)
        what = f"{arch} header options {picks}"
    elif kind == "scale":
        config["scale"] = rng.choice(VALUES)
        what = f"{arch} header scale={config['scale']!r}"
    elif kind == "arch":
        config["arch"] = rng.choice([*nlsr.models.available(), "EDSR", "", "../x", 3, None])
        what = f"{arch} header arch={config['arch']!r}"
    elif kind == "shape":
        # Options asking for an enormous model, alone or together.
        config["options"][rng.choice(["n_feats", "n_resblocks", "n_resgroups"])] = rng.choice(
            [10**5, 10**6, 10**9, 2**31 - 1]
        )
        what = f"{arch} header for a huge model {config['options']}"
    else:
        raw = rng.choice(
            [
                "",
                "{",
                "null",
                "[]",
                '"edsr"',
                '{"arch": "edsr"}',
                '{"arch": "edsr", "scale": 2, "options": []}',
                '{"arch": "edsr", "scale": true, "options": {}}',
                '{"arch": "edsr", "scale": 2, "options": {"n_feats": 1' + "0" * 5000 + "}}",
                "[" * 100000 + "]" * 100000,
                json.dumps(config)[: rng.randint(1, 40)],
                json.dumps(config).replace("2", "NaN", 1),
            ]
        )
        return f"{arch} raw header {raw[:60]!r}", _nlsr_file(tensors, None, raw), {}
    return what, _nlsr_file(tensors, config), {}


def test_fuzz_headers(tmp_path: Path) -> None:
    _run(tmp_path, _header_case)


# --------------------------------------------------------------------------- tensors


def _mutate_tensors(rng: random.Random, sd: dict[str, torch.Tensor]) -> tuple[str, dict]:
    sd = dict(sd)
    key = rng.choice(sorted(sd))
    kind = rng.choice(
        ["dtype", "dtype", "nan", "missing", "extra", "shape", "scalar", "empty", "rename", "value"]
    )
    t = sd[key]
    if kind == "dtype":
        dtype = rng.choice(DTYPES)
        sd[key] = t.to(dtype) if dtype != torch.bool else t > 0
        return f"{key} as {dtype}", sd
    if kind == "nan":
        bad = t.clone().float()
        bad.view(-1)[rng.randrange(bad.numel())] = rng.choice([math.nan, math.inf, -math.inf])
        sd[key] = bad
        return f"a NaN/Inf in {key}", sd
    if kind == "missing":
        del sd[key]
        return f"{key} missing", sd
    if kind == "extra":
        sd[rng.choice([f"{key}.extra", "body.99.weight", "tail.5.bias", "x"])] = torch.zeros(3)
        return "an extra key", sd
    if kind == "shape":
        shape = [rng.choice([0, 1, 2, 3, 8, 9, 32]) for _ in range(rng.randint(0, 5))]
        sd[key] = torch.zeros(shape)
        return f"{key} with shape {shape}", sd
    if kind == "scalar":
        sd[key] = torch.tensor(1.0)
        return f"{key} a scalar", sd
    if kind == "empty":
        sd[key] = torch.zeros(0)
        return f"{key} empty", sd
    if kind == "rename":
        sd[key.replace("body", "bod") if "body" in key else key + "_"] = sd.pop(key)
        return f"{key} renamed", sd
    value = rng.choice([1e30, -1e30, 0.0, 1e-45])
    sd[key] = torch.full_like(t, value) if t.is_floating_point() else t
    return f"{key} full of {value}", sd


def _odd_pt_content(rng: random.Random, sd: dict[str, torch.Tensor]) -> tuple[str, Any]:
    """Plain-container content torch.load(weights_only=True) accepts but is no state dict."""
    key = rng.choice(sorted(sd))
    t = sd[key]
    choices: list[tuple[str, Any]] = [
        ("a list", list(sd.values())),
        ("a tensor", t),
        ("an int", 3),
        ("None", None),
        ("an empty dict", {}),
        ("a non-tensor entry", {**sd, key: 1.5}),
        ("a string entry", {**sd, key: "weights"}),
        ("an int key", {**sd, 7: t}),
        ("nested wrappers", {"model": {"state_dict": {"params": sd}}, "epoch": 3}),
        ("a wrapper of junk", {"params": [1, 2], "model": None}),
        ("a sparse tensor", {**sd, key: t.to_sparse()}),
        ("a complex tensor", {**sd, key: t.to(torch.complex64)}),
        ("a stride-0 view of 10^10 values", {**sd, key: torch.zeros(1).expand(10**10)}),
        ("a huge stride-0 head", {**sd, "head.0.weight": torch.zeros(1).expand(10**5, 3, 3, 3)}),
        ("duplicate keys via module.", {**sd, f"module.{key}": t}),
        (
            "a parameter",
            {
                **sd,
                key: torch.nn.Parameter(
                    t.float() if t.is_floating_point() else t, requires_grad=False
                ),
            },
        ),
    ]
    if t.is_floating_point() and t.dim() > 0:
        q = torch.quantize_per_tensor(t.float(), 0.1, 0, torch.qint8)
        choices.append(("a quantized tensor", {**sd, key: q}))
    return rng.choice(choices)


def _tensor_case(rng: random.Random, i: int) -> tuple[str, bytes, dict]:
    arch = rng.choice(sorted(BASES))
    sd = STATES[arch]
    fmt = rng.choice(["pt", "pt", "pt-legacy", "plain-st", "nlsr"])
    if fmt.startswith("pt") and rng.random() < 0.3:
        what, content = _odd_pt_content(rng, sd)
        return f"{arch} {fmt}: {what}", _pt_bytes(content, fmt == "pt-legacy"), {}
    what, mutated = _mutate_tensors(rng, sd)
    for _ in range(rng.choice([0, 0, 1, 2])):
        more, mutated = _mutate_tensors(rng, mutated)
        what += f"; {more}"
    kwargs: dict[str, Any] = {}
    if rng.random() < 0.2:
        kwargs = {"arch": arch, "scale": rng.choice([2, 3, 4]), **BASES[arch]}
    if fmt.startswith("pt"):
        data = _pt_bytes(mutated, fmt == "pt-legacy")
    else:
        if any(t.dtype == torch.complex64 for t in mutated.values()):
            return f"{arch} {fmt}: {what} (complex: as .pt)", _pt_bytes(mutated), kwargs
        tensors = {k: v.contiguous() for k, v in mutated.items()}
        config = {"arch": arch, "scale": 2, "options": BASES[arch]}
        data = _nlsr_file(tensors, config) if fmt == "nlsr" else st_save(tensors)
    return f"{arch} {fmt}: {what} {kwargs or ''}", data, kwargs


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_fuzz_tensors(tmp_path: Path) -> None:
    _run(tmp_path, _tensor_case)


# --------------------------------------------------------------------------- bytes


def _huge_safetensors_shape(data: bytes, rng: random.Random) -> bytes:
    """Rewrite the safetensors header so that one tensor declares an enormous shape."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    key = rng.choice(sorted(k for k in header if k != "__metadata__"))
    header[key]["shape"] = rng.choice([[10**12], [2**31, 2**31], [10**5, 10**5, 3, 3], [-1]])
    if rng.random() < 0.5:  # offsets consistent with the shape, data missing
        start = header[key]["data_offsets"][0]
        header[key]["data_offsets"] = [start, start + 4 * math.prod(header[key]["shape"])]
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def _byte_case(rng: random.Random, i: int) -> tuple[str, bytes, dict]:
    arch = rng.choice(sorted(BASES))
    sd = STATES[arch]
    fmt = rng.choice(["pt", "pt-legacy", "nlsr"])
    if fmt == "nlsr":
        data = _nlsr_file(sd, {"arch": arch, "scale": 2, "options": BASES[arch]})
    else:
        data = _pt_bytes(sd, fmt == "pt-legacy")
    kind = rng.choice(["truncate", "flip", "garbage", "splice", "huge"])
    if kind == "huge" and fmt == "nlsr":
        return f"{arch} {fmt}: huge declared shape", _huge_safetensors_shape(data, rng), {}
    if kind in ("truncate", "huge"):
        cut = rng.randrange(1, len(data))
        return f"{arch} {fmt}: truncated at {cut} of {len(data)}", data[:cut], {}
    buf = bytearray(data)
    if kind == "flip":
        spots = [rng.randrange(len(buf)) for _ in range(rng.randint(1, 8))]
        for at in spots:
            buf[at] ^= 1 << rng.randrange(8)
        return f"{arch} {fmt}: bits flipped at {spots}", bytes(buf), {}
    if kind == "garbage":
        at = rng.randrange(len(buf))
        size = rng.randint(1, 256)
        buf[at : at + size] = rng.randbytes(size)
        return f"{arch} {fmt}: {size} garbage bytes at {at}", bytes(buf), {}
    head = data[: rng.randrange(1, 64)]
    return f"{arch} {fmt}: header then garbage", head + rng.randbytes(rng.randint(0, 4096)), {}


def test_fuzz_bytes(tmp_path: Path) -> None:
    _run(tmp_path, _byte_case)


# --------------------------------------------------------------------------- acceptance

_MEASURE = textwrap.dedent(
    """
    import json, resource, sys, time
    import nlsr
    from nlsr.checkpoint import CheckpointError

    nlsr.load(sys.argv[1])  # warm-up: every module imported, a small model built
    for path in sys.argv[2:]:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        try:
            nlsr.load(path)
            outcome = "loaded"
        except CheckpointError as e:
            outcome = str(e)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"seconds": seconds, "grown_kib": after - before, "outcome": outcome}))
    """
)
#: Header options asking for a gigantic model, and what the refusal must name.
GIGANTIC = [({"n_resblocks": 10**6}, "n_resblocks=1000000"), ({"n_feats": 10**5}, "n_feats=100000")]


def test_gigantic_headers_are_refused_fast_without_allocating(tmp_path: Path) -> None:
    """Measured in a fresh process: the time of each refusal and how far it raised the peak
    resident memory (``ru_maxrss``) above the warmed-up process's."""
    config = {"arch": "edsr", "scale": 2, "options": BASES["edsr"]}
    small = tmp_path / "small.safetensors"
    small.write_bytes(_nlsr_file(STATES["edsr"], config))
    paths = []
    for i, (options, _) in enumerate(GIGANTIC):
        paths.append(tmp_path / f"huge{i}.safetensors")
        header = {**config, "options": {**BASES["edsr"], **options}}
        paths[-1].write_bytes(_nlsr_file(STATES["edsr"], header))
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(small), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    results = [json.loads(line) for line in done.stdout.strip().splitlines()[-len(GIGANTIC) :]]
    for (_, named), result in zip(GIGANTIC, results, strict=True):
        assert named in result["outcome"] and "limit" in result["outcome"], result
        assert result["seconds"] < 5, result
        assert result["grown_kib"] < 200 * 1024, result  # 200 MiB; the models need GiB to TiB
