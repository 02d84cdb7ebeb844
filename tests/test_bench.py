"""Tests of the benchmark suite (nlsr.bench, ``nlsr bench``): exponent fit, memory meter, JSON."""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import nlsr.bench.inputs
from nlsr.attention import available_attention
from nlsr.attention.reference import naive_sparsemax
from nlsr.bench.inputs import (
    NETWORKS,
    load_source,
    make_inputs,
    network_channels,
    network_features,
    real_features,
    real_images,
    window,
)
from nlsr.bench.measuring import BenchError, MemoryMeter, extrapolate, fit_exponent, measure
from nlsr.bench.reporting import SCHEMA_VERSION, Row, Settings, parse_bytes, read_json
from nlsr.bench.suite import (
    PROBE_FROM,
    SharedPatternAdapter,
    build_model,
    fit_rows,
    run_suite,
)
from nlsr.cli import main

MIB = 2**20


def _block() -> str:
    """A registered block to run the tiny suite with (dense NLA preferred: fastest to build)."""
    names = available_attention()
    if not names:
        pytest.skip("no attention block is registered yet")
    return "nla" if "nla" in names else names[0]


def _bench(options: str, *more: str | Path) -> int:
    """Run `nlsr bench` with the space-separated `options`, then `more` arguments (paths)."""
    return main(["bench", *options.split(), *map(str, more)])


# ----------------------------------------------------------------------------- exponent fit


@pytest.mark.parametrize("exponent", [0.5, 1.0, 1.15, 2.0])
def test_fit_exponent_recovers_a_power_law(exponent: float) -> None:
    positions = [48**2, 96**2, 192**2, 384**2]
    values = [3e-6 * p**exponent for p in positions]
    assert fit_exponent(positions, values) == pytest.approx(exponent, abs=1e-9)


def test_fit_exponent_is_the_least_squares_slope_under_noise() -> None:
    # log(positions) equally spaced (centred: -1.5, -0.5, 0.5, 1.5 steps); log-noise +e, -e, -e,
    # +e is orthogonal to them, so the least-squares slope is exactly the true exponent.
    positions = [100, 1000, 10000, 100000]
    noise = [1.1, 1 / 1.1, 1 / 1.1, 1.1]  # symmetric: leaves the slope unchanged
    values = [p**1.3 * n for p, n in zip(positions, noise, strict=True)]
    assert fit_exponent(positions, values) == pytest.approx(1.3, abs=1e-9)
    tilted = [p**1.3 * n for p, n in zip(positions, [0.9, 1.0, 1.0, 1.1], strict=True)]
    xs = [math.log(p) for p in positions]
    ys = [math.log(v) for v in tilted]
    mx, my = sum(xs) / 4, sum(ys) / 4
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    assert fit_exponent(positions, tilted) == pytest.approx(slope, rel=1e-12)
    assert slope > 1.3


def test_fit_exponent_needs_two_distinct_points() -> None:
    with pytest.raises(BenchError):
        fit_exponent([100], [1.0])
    with pytest.raises(BenchError):
        fit_exponent([100, 100], [1.0, 2.0])


def test_extrapolate_follows_the_last_slope_but_never_below_linear() -> None:
    assert extrapolate([], 10) is None
    assert extrapolate([(100, 1.0), (400, 16.0)], 1600) == pytest.approx(256.0)
    # Sub-linear growth at small sizes (fixed overheads) is not trusted: at least linear.
    assert extrapolate([(100, 1.0), (400, 1.5)], 1600) == pytest.approx(6.0)
    assert extrapolate([(100, 2.0)], 300) == pytest.approx(6.0)


# ----------------------------------------------------------------------------- memory meter


def test_memory_meter_sees_a_transient_allocation_of_known_size() -> None:
    meter = MemoryMeter("cpu")
    if meter.method == "unavailable":
        pytest.skip("no way to read this process's memory on this platform")
    size = 96 * MIB
    with meter.track() as usage:
        t = torch.ones(size // 4)  # written, so resident
        del t  # freed before the end: only a peak tracker can see it
        if meter.method == "rss-sampling-1ms":
            time.sleep(0.05)
    assert usage.extra_bytes == pytest.approx(size, abs=8 * MIB)
    with meter.track() as idle:
        pass
    assert idle.extra_bytes is not None and idle.extra_bytes < 4 * MIB


def test_memory_meter_sampling_fallback_sees_a_held_allocation() -> None:
    meter = MemoryMeter("cpu")
    if meter.method == "unavailable":
        pytest.skip("no way to read this process's memory on this platform")
    meter.method = "rss-sampling-1ms"
    size = 64 * MIB
    with meter.track() as usage:
        t = torch.ones(size // 4)
        time.sleep(0.05)
        del t
    assert usage.extra_bytes == pytest.approx(size, abs=8 * MIB)


def test_measure_reports_every_run_and_the_peak() -> None:
    calls = []

    def fn() -> None:
        calls.append(torch.ones(32 * MIB // 4).sum())

    timing = measure(fn, repeat=3, warmup=2)
    assert len(calls) == 2 + 1 + 3  # warm-up, memory-tracked run, timed runs
    assert len(timing.times_s) == len(timing.cpu_times_s) == 3
    assert timing.median_s == sorted(timing.times_s)[1]
    if timing.extra_bytes is not None:
        assert timing.extra_bytes == pytest.approx(32 * MIB, abs=8 * MIB)


# ----------------------------------------------------------------------------- the suite


def test_tiny_run_json_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = _block()
    out = tmp_path / "b.json"
    status = _bench(
        f"--blocks {name} --sizes 8 --repeat 1 --channels 16 --device cpu --quiet --json", out
    )
    assert status == 0
    report = json.loads(out.read_text())
    assert report["schema"] == SCHEMA_VERSION
    env = report["environment"]
    for key in ("device", "device_name", "torch", "threads", "memory_method", "created"):
        assert key in env
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert isinstance(env["threads"], int) and env["threads"] >= 1
    assert report["settings"]["sizes"] == [8] and report["settings"]["repeat"] == 1
    rows = report["rows"]
    assert [(r["name"], r["mode"]) for r in rows] == [(name, "infer"), (name, "train")]
    for r in rows:
        assert r["status"] == "ok", r["note"]
        assert r["kind"] == "block" and r["size"] == 8 and r["positions"] == 64
        assert r["channels"] == 16 and r["input_bytes"] == 16 * 64 * 4
        assert len(r["times_s"]) == 1 and r["times_s"][0] > 0
        assert r["median_s"] == r["min_s"] == r["times_s"][0]
        assert len(r["cpu_times_s"]) == 1 and r["cpu_median_s"] == r["cpu_times_s"][0]
        assert r["parameters"] > 0
        if env["memory_method"] != "unavailable":
            assert r["peak_bytes"] >= r["extra_bytes"] >= 0
    assert report["fits"] == []  # one size: no exponent
    assert "positions" in capsys.readouterr().out


def test_sizes_beyond_the_limits_are_skipped_with_a_note() -> None:
    settings = Settings(
        blocks=[_block()], sizes=[16, 8], channels=8, modes=["infer"], repeat=1, max_seconds=1e-9
    )
    report = run_suite(settings)
    first, second = report.rows
    assert (first.size, first.status) == (8, "ok")
    assert (second.size, second.status) == (16, "skipped")
    assert "--max-seconds" in second.note and second.times_s == []


class _Broken(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def test_a_failing_block_is_reported_and_larger_sizes_skipped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import nlsr.attention.registry

    available_attention()  # register the real blocks first
    monkeypatch.setitem(nlsr.attention.registry._BLOCKS, "broken", _Broken)
    report = run_suite(
        Settings(blocks=["broken"], sizes=[8, 16], channels=4, modes=["infer"], repeat=1)
    )
    first, second = report.rows
    assert first.status == "error" and first.note == "RuntimeError: boom"
    assert second.status == "skipped" and "not measured" in second.note
    assert _bench("--blocks broken --sizes 8 --mode infer --repeat 1 --quiet") == 1
    assert "RuntimeError: boom" in capsys.readouterr().out


def test_a_large_first_size_is_probed_before_it_runs() -> None:
    settings = Settings(
        blocks=[_block()],
        sizes=[PROBE_FROM],
        channels=8,
        modes=["infer"],
        repeat=1,
        max_seconds=1e-9,
    )
    (row,) = run_suite(settings).rows
    side = PROBE_FROM
    assert row.status == "skipped"
    assert f"(from sides {side // 8}, {side // 4})" in row.note


def test_fits_come_from_the_measured_rows() -> None:
    rows = [
        Row(
            "block",
            "x",
            s,
            s * s,
            8,
            "infer",
            "ok",
            median_s=1e-6 * (s * s) ** 1.5,
            extra_bytes=1000 * s * s,
        )
        for s in (48, 96, 192)
    ]
    fits = {f.metric: f for f in fit_rows(rows, (96, 384))}
    assert fits["time"].exponent == pytest.approx(1.5)
    assert fits["memory"].exponent == pytest.approx(1.0)
    assert fits["time"].sizes == [96, 192]


def test_dense_attention_can_replace_a_networks_own() -> None:
    from nlsr.models import available, small_config

    if "lcoan" not in available() or "nla" not in available_attention():
        pytest.skip("needs the lcoan network and the nla block")
    model = build_model("lcoan+nla", scale=2, config="small")
    names = {type(m).__name__ for m in model.modules()}
    assert "LCoA" not in names
    adapters = [m for m in model.modules() if isinstance(m, SharedPatternAdapter)]
    assert len(adapters) == small_config("lcoan")["n_resgroups"]
    with torch.inference_mode():
        assert model.eval()(torch.rand(1, 3, 10, 12)).shape == (1, 3, 20, 24)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--blocks", "nosuch"], "--blocks"),
        (["--models", "nosuch"], "--models"),
        (["--sizes", "8,x"], "--sizes"),
        (["--mode", "fast"], "--mode"),
        (["--max-memory", "lots"], "--max-memory"),
        (["--fit-range", "384,96"], "--fit-range"),
    ],
)
def test_bad_options_fail_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _block()
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_parse_bytes() -> None:
    assert parse_bytes("4G") == 4 * 2**30
    assert parse_bytes("512MiB") == 512 * MIB
    assert parse_bytes("1000") == 1000


def test_plot_without_matplotlib_says_how_to_get_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("matplotlib is installed")
    out = tmp_path / "p.png"
    status = main(["bench", "--blocks", _block(), "--sizes", "8", "--plot", str(out)])
    assert status == 2
    assert "nlsr[bench]" in capsys.readouterr().err
    assert not out.exists()


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "p.png"
    status = _bench(f"--blocks {_block()} --sizes 8,12 --repeat 1 --channels 8 --quiet --plot", out)
    assert status == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_released_baseline_rows_and_ratios(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    status = _bench(
        "--blocks gla,hspa --sizes 12 --repeat 1 --channels 16 --device cpu --mode infer "
        "--baseline released --quiet --json",
        out,
    )
    assert status == 0
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["gla", "gla@released", "hspa", "hspa@released"]
    ratios = {q["name"]: q for q in report["baseline_ratios"]}
    assert set(ratios) == {"gla", "hspa"}
    rows = {r["name"]: r for r in report["rows"]}
    for name, q in ratios.items():
        assert q["baseline"] == "released" and q["size"] == 12 and q["mode"] == "infer"
        want = rows[f"{name}@released"]["cpu_median_s"] / rows[name]["cpu_median_s"]
        assert q["cpu_ratio"] == pytest.approx(want)
    with pytest.raises(SystemExit):
        main(["bench", "--blocks", "gla", "--baseline", "authors"])


def test_resblock_reference_row(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    status = _bench(
        "--blocks resblock --sizes 8 --repeat 1 --channels 16 --device cpu --mode infer "
        "--quiet --json",
        out,
    )
    assert status == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["name"] == "resblock" and row["status"] == "ok"
    assert row["parameters"] == 2 * (16 * 16 * 9 + 16)  # two 3x3 convolutions with bias


def test_saved_results_are_merged_and_reprinted(tmp_path: Path, capsys) -> None:
    a, b, merged = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "m.json"
    for path, size in ((a, "8"), (b, "12")):
        assert (
            _bench(
                f"--blocks resblock --sizes {size} --repeat 1 --channels 8 --device cpu "
                "--mode infer --quiet --json",
                path,
            )
            == 0
        )
    capsys.readouterr()
    assert main(["bench", "--from-json", str(a), str(b), "--json", str(merged)]) == 0
    out = capsys.readouterr().out
    rows = json.loads(merged.read_text())["rows"]
    saved = [json.loads(p.read_text())["rows"][0] for p in (a, b)]
    assert rows == saved and "resblock" in out
    (tmp_path / "bad.json").write_text("{}")
    assert main(["bench", "--from-json", str(tmp_path / "bad.json")]) == 2
    assert "bad.json" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["both", "infer,train", "train"])
def test_mode_option_names_the_measured_modes(mode: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    options = f"--blocks resblock --sizes 8 --repeat 1 --warmup 0 --channels 4 --mode {mode}"
    assert _bench(f"{options} --quiet --json", out) == 0
    measured = [row["mode"] for row in json.loads(out.read_text())["rows"]]
    assert measured == (["infer", "train"] if mode != "train" else ["train"])


# ----------------------------------------------------------------------------- inputs


def _captured_inputs(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The inputs every measured point of the suite is timed on, recorded as they are made."""
    import nlsr.bench.suite

    seen: list[torch.Tensor] = []
    real_workload = nlsr.bench.suite.workload

    def recording(module: torch.nn.Module, inputs: torch.Tensor, mode: str):
        seen.append(inputs.detach().clone())
        return real_workload(module, inputs, mode)

    monkeypatch.setattr(nlsr.bench.suite, "workload", recording)
    return seen


def test_real_inputs_are_deterministic_standardised_features_of_the_image() -> None:
    source = load_source()
    assert source.shape == (3, 256, 256) and source.min() >= 0 and source.max() <= 1
    cpu = torch.device("cpu")
    shape = (2, 16, 20, 20)
    first = make_inputs("block", shape, source, 0, cpu)
    assert first.shape == shape and first.dtype == torch.float32
    assert torch.equal(first, make_inputs("block", shape, source, 0, cpu))  # deterministic
    std = first.std(dim=(2, 3), correction=0)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-5)
    assert first.mean(dim=(2, 3)).abs().max() < 1e-5
    assert not torch.equal(first[0], first[1])  # items are the window turned differently
    torch.manual_seed(0)
    random = torch.randn(shape)
    assert not torch.allclose(first, random, atol=0.5)

    # Real features are spatially correlated (neighbours alike), random ones are not.
    def neighbour_correlation(x: torch.Tensor) -> float:
        return float((x[..., 1:] * x[..., :-1]).mean())

    assert neighbour_correlation(first) > 0.1 > 0.05 > abs(neighbour_correlation(random))
    assert not torch.equal(first, make_inputs("block", shape, source, 1, cpu))  # --seed counts
    images = make_inputs("model", (1, 3, 20, 20), source, 0, cpu)
    assert images.shape == (1, 3, 20, 20) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images[0], source[:, 118:138, 118:138])  # the centred crop


def test_a_window_larger_than_the_image_is_mirrored_beyond_it() -> None:
    source = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    big = window(source, 7)  # rows -2..4 of 3, columns -2..4 of 4: edges repeated
    assert big.shape == (2, 7, 7)
    assert big[0, :, 2].tolist() == [source[0, r, 0].item() for r in (1, 0, 0, 1, 2, 2, 1)]
    assert big[1, 2, :].tolist() == [source[1, 0, c].item() for c in (1, 0, 0, 1, 2, 3, 3)]
    assert torch.equal(window(source, 2), source[:, 0:2, 1:3])
    assert real_images(torch.rand(3, 10, 10), 300, batch=9).shape == (9, 3, 300, 300)


def test_random_input_reproduces_the_old_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    from nlsr.attention import create_attention

    seen = _captured_inputs(monkeypatch)
    settings = Settings(
        blocks=["nla"], models=["bicubic"], sizes=[8], channels=4, modes=["infer"], repeat=1
    )
    run_suite(replace(settings, input="random", seed=3))
    torch.manual_seed(3)
    create_attention("nla", 4)
    assert torch.equal(seen[0], torch.randn(1, 4, 8, 8))
    torch.manual_seed(3)
    build_model("bicubic")
    assert torch.equal(seen[1], torch.rand(1, 3, 8, 8))
    run_suite(settings)  # real, the default
    source = load_source()
    assert torch.equal(seen[2], make_inputs("block", (1, 4, 8, 8), source, 0, torch.device("cpu")))
    assert torch.equal(seen[3], real_images(source, 8))


def _dense_supports(block: torch.nn.Module, x: torch.Tensor, step: int = 1) -> list[int]:
    """Support sizes of HSPA ``block`` on ``x`` from the dense float64 reference sparsemax."""
    with torch.no_grad():
        theta = block.conv_match1(x).flatten(2).transpose(1, 2).double()
        phi = block.conv_match2(x).flatten(2).double()
        weights = naive_sparsemax(theta[:, ::step] @ phi)
    return (weights > 0).sum(-1).flatten().tolist()


@pytest.mark.parametrize("limit", [None, 10])
def test_hspa_support_report_equals_a_dense_count(
    limit: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nlsr.attention import create_attention

    if limit is not None:  # 144 positions, at most 10 queries counted: every 15th
        monkeypatch.setattr(nlsr.bench.inputs, "SUPPORT_QUERIES", limit)
    settings = Settings(
        blocks=["hspa"], sizes=[12], channels=16, modes=["infer"], repeat=1, baseline="released"
    )
    ours, released = run_suite(settings).rows
    torch.manual_seed(0)
    block = create_attention("hspa", 16)
    x = real_features(load_source(), 12, 16)
    want = _dense_supports(block, x, 1 if limit is None else 15)
    assert len(want) == (144 if limit is None else 10)
    assert ours.supports is not None
    assert ours.supports["median"] == statistics.median(want)
    assert ours.supports["max"] == max(want)
    assert ours.supports["mean"] == pytest.approx(statistics.fmean(want))
    assert (ours.supports["queries"], ours.supports["calls"]) == (len(want), 1)
    assert released.supports == ours.supports  # the released form meets the same supports


def test_supports_of_every_hspa_block_of_a_network_and_none_elsewhere() -> None:
    from nlsr.attention.hspa import HSPA

    report = run_suite(
        Settings(blocks=["nla"], models=["hspan"], sizes=[8], channels=8, modes=["infer"], repeat=1)
    )
    block, network = report.rows
    assert block.supports is None
    blocks = sum(isinstance(m, HSPA) for m in build_model("hspan").modules())
    assert blocks >= 2
    assert network.supports["calls"] == len(network.supports["call_medians"]) == blocks
    assert network.supports["queries"] == 64 * blocks

    # Real content widens the supports (C = 64, 24x24: median 7 and largest 29 keys, 4 and 10
    # on random maps).
    settings = Settings(blocks=["hspa"], sizes=[24], channels=64, modes=["infer"], repeat=1)
    (real,) = run_suite(settings).rows
    (random,) = run_suite(replace(settings, input="random")).rows
    assert real.supports["median"] > random.supports["median"]
    assert real.supports["max"] > 2 * random.supports["max"]


def test_input_options_and_old_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--blocks", "nla", "--input", "random", "--input-image", "x.png"]) == 2
    assert "--input-image" in capsys.readouterr().err
    assert main(["bench", "--blocks", "nla", "--sizes", "8", "--input-image", "nosuch.png"]) == 2
    assert "nosuch.png" in capsys.readouterr().err
    out = tmp_path / "b.json"
    assert _bench("--blocks hspa --sizes 8 --repeat 1 --mode infer --quiet --json", out) == 0
    saved = json.loads(out.read_text())
    assert saved["settings"]["input"] == "real" and saved["settings"]["input_image"] is None
    assert saved["rows"][0]["supports"]["queries"] == 64
    assert "inputs: real" in capsys.readouterr().out
    old = tmp_path / "old.json"  # written before --input: no input setting, no supports
    del saved["settings"]["input"], saved["settings"]["input_image"], saved["rows"][0]["supports"]
    old.write_text(json.dumps(saved))
    report = read_json([old])
    assert report.settings.input == "random" and report.rows[0].supports is None


# ----------------------------------------------------------------------------- network inputs


def _hooked_inputs(name: str, side: int, batch: int = 1) -> list[torch.Tensor]:
    """The inputs of every call of block ``name`` (its class) inside its paper network, seeded
    with 0, on the real crop, captured by plain forward pre-hooks over a whole forward pass."""
    from nlsr.attention import create_attention
    from nlsr.models import create
    from nlsr.models.common import ResBlock

    kind = ResBlock if name == "resblock" else type(create_attention(name, 8))
    torch.manual_seed(0)
    arch, options = NETWORKS[name]
    network = create(arch, 2, **options).eval()
    seen: list[torch.Tensor] = []
    for m in network.modules():
        if isinstance(m, kind):
            m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
            if hasattr(m, "forward_shared"):  # LCoAN calls its blocks through it, past hooks
                shared = m.forward_shared
                m.forward_shared = lambda x, *a, f=shared: (seen.append(x.clone()), f(x, *a))[1]
    with torch.no_grad():
        network(real_images(load_source(), side, batch))
    return seen


@pytest.mark.parametrize("name", ["hspa", "lcoa", "csna", "resblock"])
def test_network_features_equal_a_direct_hook_capture(name: str) -> None:
    side = 13  # odd: CSNLN pads its input to even sides, the features are cropped back
    state = torch.get_rng_state()
    first = network_features(name, load_source(), side, batch=2)
    assert torch.equal(torch.get_rng_state(), state)  # the global random state is untouched
    assert first.shape == (2, network_channels(name), side, side)
    assert not first.requires_grad
    want = _hooked_inputs(name, side, batch=2)[0]
    assert torch.equal(first, want[..., :side, :side])
    assert torch.equal(first, network_features(name, load_source(), side, batch=2))  # again
    if name != "csna":  # CSNLN's single block is called once per recurrence
        assert want.shape[-1] == side
    # Inside the network the features are far from unit std (HSPAN: about 0.2 per channel).
    assert first.std(dim=(2, 3)).median() < 0.5


def test_input_block_selects_a_later_call() -> None:
    calls = _hooked_inputs("hspa", 10)
    assert len(calls) == 10  # HSPAN: one HSPA per residual group
    got = network_features("hspa", load_source(), 10, index=3)
    assert torch.equal(got, calls[3]) and not torch.equal(got, calls[0])
    with pytest.raises(BenchError, match="10 times"):
        network_features("hspa", load_source(), 10, index=10)
    assert network_channels("hspa") == 192 and network_channels("nlsa") == 256


def test_network_input_feeds_every_block_its_networks_features(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = _captured_inputs(monkeypatch)
    settings = Settings(
        blocks=["hspa", "resblock"],
        sizes=[12],
        channels=8,  # ignored: the blocks get their network's channel count
        modes=["infer", "train"],
        repeat=1,
        baseline="released",
        input="network",
    )
    report = run_suite(settings)
    assert [(r.name, r.channels, r.status) for r in report.rows] == [
        ("hspa", 192, "ok"),
        ("hspa", 192, "ok"),
        ("hspa@released", 192, "ok"),
        ("hspa@released", 192, "ok"),
        ("resblock", 256, "ok"),
        ("resblock", 256, "ok"),
    ]
    hspa = network_features("hspa", load_source(), 12)
    assert all(torch.equal(x, hspa) for x in seen[:4])
    assert torch.equal(seen[4], network_features("resblock", load_source(), 12))
    run_suite(replace(settings, blocks=[], models=["bicubic"], baseline=None))
    assert torch.equal(seen[-1], real_images(load_source(), 12))  # networks: the real crop

    # HSPA meets wider supports on its network's features than on unit-std real features.
    (network,) = run_suite(
        Settings(blocks=["hspa"], sizes=[24], modes=["infer"], repeat=1, input="network")
    ).rows
    (real,) = run_suite(
        Settings(blocks=["hspa"], sizes=[24], channels=192, modes=["infer"], repeat=1)
    ).rows
    assert network.supports["median"] > 2 * real.supports["median"]


def test_network_input_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _bench("--blocks nla --input-block 1") == 2
    assert "--input network" in capsys.readouterr().err
    assert _bench("--blocks nla --input network --input-block -1") == 2
    assert "--input-block" in capsys.readouterr().err
    assert _bench("--blocks hspa --sizes 8 --input network --input-block 10 --quiet") == 2
    assert "10 times" in capsys.readouterr().err
    out = tmp_path / "n.json"
    options = "--blocks hspa --sizes 8 --repeat 1 --mode infer --quiet --input network"
    assert _bench(f"{options} --input-block 2 --json", out) == 0
    assert "inputs: network" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["settings"]["input"] == "network" and saved["settings"]["input_block"] == 2
    assert saved["rows"][0]["channels"] == 192
    del saved["settings"]["input_block"]  # written before --input-block: the default, 0
    out.write_text(json.dumps(saved))
    assert read_json([out]).settings.input_block == 0
