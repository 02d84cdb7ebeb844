"""``nlsr bench``: time and peak memory of attention blocks and networks versus input size.

See :mod:`nlsr.bench` for what is measured and how; ``docs/performance.md`` for figures.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nlsr.bench.reporting import Settings


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(option: str, text: str, minimum: int = 1) -> list[int]:
    from nlsr.bench.measuring import BenchError

    try:
        values = [int(t) for t in _names(text)]
    except ValueError:
        raise BenchError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise BenchError(f"{option}: expected integers >= {minimum}, got {text!r}")
    return values


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``nlsr bench``."""
    p = subparsers.add_parser(
        "bench",
        help="time and peak memory of attention blocks and networks versus input size",
        description="Measure forward (infer) and forward+backward (train) time and peak memory "
        "of attention blocks and networks over square feature maps, and fit the scaling "
        "exponent of time versus positions. Sizes are measured in ascending order; a size whose "
        "time or memory, extrapolated from the smaller sizes, exceeds --max-seconds or "
        "--max-memory is skipped with a note.",
    )
    p.add_argument(
        "--blocks",
        help="attention blocks, comma-separated (default: all registered, unless --models is "
        "given); 'resblock' adds the conv-ReLU-conv block as a reference; 'none' for no block",
    )
    p.add_argument(
        "--models",
        default="",
        help="networks, comma-separated; ARCH+BLOCK is the network with its attention replaced "
        "by BLOCK (e.g. lcoan+nla) or with attention=BLOCK (edsr, rcan)",
    )
    p.add_argument(
        "--config",
        choices=("small", "paper"),
        default="small",
        help="network size: reduced (default) or the paper's",
    )
    p.add_argument("--scale", type=int, default=2, help="network upscaling factor (default 2)")
    p.add_argument(
        "--sizes",
        default="48,96,192,384",
        help="feature-map sides, comma-separated (default 48,96,192,384)",
    )
    p.add_argument(
        "--channels",
        type=int,
        default=64,
        help="block channels (default 64; with --input network a block has its network's)",
    )
    p.add_argument(
        "--input",
        choices=("real", "random", "network"),
        default="real",
        help="real (default): networks get centred crops of one image, blocks its features "
        "(a fixed seeded 3x3 convolution to C channels, standardised); network: blocks get "
        "the features at their position inside their paper network (hspa: HSPAN, nlsa: NLSN, "
        "gla: DLSN, lcoa: LCoAN, csna: CSNLN, nla: EDSR+nla, resblock: EDSR; untrained, "
        "seeded) run on that crop, with the network's channel count (--channels does not "
        "apply); random: torch.randn feature maps and torch.rand images",
    )
    p.add_argument(
        "--input-block",
        type=int,
        default=0,
        metavar="K",
        help="with --input network: feed the input of the block's K-th call inside its "
        "network (default 0, the first)",
    )
    p.add_argument(
        "--input-image",
        metavar="FILE",
        help="the image real inputs come from (default: the bundled sample, "
        "nlsr/assets/sample.png; also of --input network), e.g. a benchmark HR image",
    )
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument(
        "--mode",
        default="infer,train",
        help="infer (forward, inference mode), train (forward+backward) or both (the default, "
        "the same as infer,train)",
    )
    p.add_argument("--repeat", type=int, default=5, help="timed runs per point (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--device", default="auto", help="cpu, cuda[:i] or auto (default)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--max-memory",
        default="4G",
        help="skip points predicted to need more extra memory (default 4G; 'none')",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=30.0,
        help="skip points predicted to take longer per run (default 30; 0 = no limit)",
    )
    p.add_argument(
        "--fit-range",
        default="96,384",
        help="MIN,MAX sides (inclusive) used to fit the exponents (default 96,384)",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile one run of every point and print its top N operators",
    )
    p.add_argument("--seed", type=int, default=0, help="torch seed before every point")
    p.add_argument(
        "--baseline",
        choices=("released",),
        help="also measure every NLSA/GLA/HSPA/CSNA block and network computed the way the "
        "authors' released code does (rows NAME@released) and print the ratios",
    )
    p.add_argument("--json", metavar="FILE", help="write the full results as JSON")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="log-log plot of time and memory (needs the optional extra 'bench')",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines, only the table")
    p.add_argument(
        "--from-json",
        metavar="FILE",
        nargs="+",
        help="measure nothing: print (and --plot) the results saved by --json in "
        "these files, merged",
    )
    p.set_defaults(run=run)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Validate the command line and turn it into :class:`nlsr.bench.reporting.Settings`."""
    from nlsr.attention import available_attention
    from nlsr.bench.measuring import MODES, BenchError
    from nlsr.bench.reporting import Settings, parse_bytes
    from nlsr.bench.suite import REFERENCE_BLOCK

    registered = available_attention()
    models = _names(args.models)
    if args.blocks is None:
        blocks = [] if models else registered
    elif args.blocks.strip().lower() == "none":
        blocks = []
    else:
        blocks = _names(args.blocks)
        unknown = [b for b in blocks if b not in registered and b != REFERENCE_BLOCK]
        if unknown:
            raise BenchError(
                f"--blocks: {', '.join(unknown)} not registered; available: {', '.join(registered)}"
            )
    if not blocks and not models:
        raise BenchError("nothing to measure: give --blocks and/or --models")
    modes = list(MODES) if args.mode == "both" else _names(args.mode)
    if not modes or any(m not in MODES for m in modes):
        raise BenchError(f"--mode: expected infer, train or both, got {args.mode!r}")
    fit = _ints("--fit-range", args.fit_range)
    if len(fit) != 2 or fit[0] > fit[1]:
        raise BenchError(f"--fit-range: expected MIN,MAX with MIN <= MAX, got {args.fit_range!r}")
    for option, value in (
        ("--channels", args.channels),
        ("--batch", args.batch),
        ("--repeat", args.repeat),
    ):
        if value < 1:
            raise BenchError(f"{option} must be >= 1, got {value}")
    if args.warmup < 0 or args.max_seconds < 0 or args.profile < 0:
        raise BenchError("--warmup, --max-seconds and --profile must not be negative")
    if args.input_image and args.input == "random":
        raise BenchError("--input-image is the source of --input real / network, not of random")
    if args.input_block < 0:
        raise BenchError(f"--input-block must be >= 0, got {args.input_block}")
    if args.input_block and args.input != "network":
        raise BenchError("--input-block applies to --input network only")
    no_limit = args.max_memory.strip().lower() in ("none", "0")
    return Settings(
        blocks=blocks,
        models=models,
        sizes=_ints("--sizes", args.sizes),
        channels=args.channels,
        modes=modes,
        repeat=args.repeat,
        warmup=args.warmup,
        device=args.device,
        config=args.config,
        scale=args.scale,
        batch=args.batch,
        max_memory=None if no_limit else parse_bytes(args.max_memory),
        max_seconds=args.max_seconds or None,
        fit_range=(fit[0], fit[1]),
        profile_top=args.profile,
        seed=args.seed,
        baseline=args.baseline,
        input=args.input,
        input_image=args.input_image,
        input_block=args.input_block,
    )


def run(args: argparse.Namespace) -> int:
    """Run the suite, print the table (and profiles), write JSON/plot; returns the exit status
    (1 when a point failed)."""
    import torch

    from nlsr.bench.measuring import BenchError, resolve_device
    from nlsr.bench.reporting import (
        format_profile,
        format_table,
        plot,
        read_json,
        require_matplotlib,
        write_json,
    )
    from nlsr.bench.suite import run_suite

    # A bad option raises BenchError (a ValueError): exit status 2, one line, from nlsr.cli.main.
    settings = settings_from_args(args)
    if args.threads is not None:
        if args.threads < 1:
            raise BenchError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.plot:
        require_matplotlib()
    resolve_device(args.device)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.from_json:
        report = read_json(args.from_json)
    else:
        report = run_suite(settings, None if args.quiet else log)
    env = report.environment
    print(
        f"device {env['device']} ({env['device_name']}), torch {env['torch']}, "
        f"{env['threads']} threads, memory: {env['memory_method']}, load average "
        f"{env['load_average_start']} -> {env['load_average_end']}"
    )
    given = report.settings
    inputs = f"inputs: {given.input}"
    if given.input != "random":
        inputs += f" ({given.input_image or 'the bundled sample'}"
        if given.input == "network":
            inputs += f"; each block fed its call {given.input_block}'s input in its network"
            widths = {r.name: r.channels for r in report.rows if r.kind == "block"}
            inputs += "".join(f", {name} C={c}" for name, c in widths.items())
        inputs += ")"
    print(inputs)
    print(format_table(report))
    for row in report.rows:
        if row.profile:
            print()
            print(format_profile(row))
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    if args.plot:
        print(f"wrote {plot(report, args.plot)}")
    return 1 if any(r.status == "error" for r in report.rows) else 0
