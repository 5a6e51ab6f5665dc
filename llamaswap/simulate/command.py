"""``llamaswap simulate``: load the configs and the trace, run, print.

The option parsing is the console script's (:mod:`llamaswap.service.cli`);
this is the rest, callable without it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from llamaswap.config import Config, ConfigError
from llamaswap.config.loader import load_config_sources
from llamaswap.config.resources import format_size
from llamaswap.simulate.engine import (
    DEFAULT_LOAD_TIME,
    Outcome,
    Simulation,
    load_times_for,
    percentile,
)
from llamaswap.simulate.trace import Request, TraceError, learned_load_times, read_trace

__all__ = ["parse_load_time", "render_text", "simulate"]


def parse_load_time(value: str) -> tuple[str, float]:
    """``model=seconds`` -> (model, seconds); ValueError with a one-line message."""
    model, sep, seconds = value.rpartition("=")
    try:
        number = float(seconds)
    except ValueError:
        number = -1.0
    if not sep or not model or not number >= 0 or number == float("inf"):
        raise ValueError(f"--load-time: expected MODEL=SECONDS (e.g. coder=12.5), got {value!r}")
    return model, number


def _load(path: str, err: TextIO) -> Config | None:
    try:
        config = load_config_sources(path, None)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{path}: {problem}", file=err)
        return None
    for warning in config.warnings:
        print(f"{path}: warning: {warning}", file=err)
    return config


def simulate(
    paths: Sequence[str],
    trace_path: str,
    given: Mapping[str, float] | None = None,
    *,
    as_json: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Replay the trace through each config; print the outcomes.  Returns
    the exit status (1: a config or the trace cannot be read)."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    configs = []
    for path in paths:
        config = _load(path, err)
        if config is None:
            return 1
        configs.append(config)
    try:
        trace = read_trace(trace_path)
    except TraceError as exc:
        print(exc, file=err)
        return 1
    given = dict(given or {})
    learned = learned_load_times(trace)
    for config in configs:
        for name in list(given):
            model = config.resolve(name)
            if model is not None and model != name:
                given.setdefault(model, given[name])
    times = load_times_for(configs, given, learned)
    sources = {
        model: "given" if model in given else "learned" if model in learned else "guessed"
        for model in times
    }
    for model in sources:
        if sources[model] == "guessed" and times[model] == DEFAULT_LOAD_TIME:
            sources[model] = "default"
    outcomes = [
        Simulation(config, times, name=path).run(trace)
        for path, config in zip(paths, configs, strict=True)
    ]
    if as_json:
        document = {
            "trace": {"path": trace_path, "requests": len(trace), "span": _span(trace)},
            "load_times": {
                model: {"seconds": times[model], "source": sources[model]}
                for model in sorted(times)
            },
            "configs": [outcome.to_json() for outcome in outcomes],
        }
        json.dump(document, out, indent=2)
        out.write("\n")
    else:
        out.write(render_text(trace_path, trace, times, sources, outcomes))
    return 0


def _span(trace: Sequence[Request]) -> float:
    return round(trace[-1].arrival - trace[0].arrival, 3) if trace else 0.0


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def render_text(
    trace_path: str,
    trace: Sequence[Request],
    times: Mapping[str, float],
    sources: Mapping[str, str],
    outcomes: Sequence[Outcome],
) -> str:
    """The report for people: the trace, the load times used, and per config
    swaps, loading seconds, evictions, peak reserved and waits per model."""
    lines = [f"trace {trace_path}: {len(trace)} requests over {_span(trace):.0f}s"]
    lines.append(
        "load times: " + ", ".join(f"{m} {times[m]:.1f}s ({sources[m]})" for m in sorted(times))
    )
    for outcome in outcomes:
        lines.append("")
        lines.append(f"{outcome.name}:")
        evictions = ", ".join(f"{n} {why}" for why, n in sorted(outcome.evictions.items()))
        lines.append(
            f"  swaps {outcome.swaps}, loading {outcome.load_seconds:.1f}s"
            + (f", evictions: {evictions}" if evictions else "")
        )
        if outcome.peak_reserved:
            lines.append(
                "  peak reserved: "
                + ", ".join(
                    f"{name} {format_size(amount)} of {format_size(outcome.totals[name])}"
                    for name, amount in outcome.peak_reserved.items()
                )
            )
        waits = outcome.all_waits()
        lines.append(
            f"  queue wait: p50 {_seconds(percentile(waits, 50))},"
            f" p99 {_seconds(percentile(waits, 99))}"
        )
        rows: list[list[Any]] = [["model", "requests", "served", "refused", "p50", "p99"]]
        for model, result in sorted(outcome.models.items()):
            rows.append(
                [
                    model,
                    result.requests,
                    result.served,
                    result.rejected + result.failed,
                    _seconds(percentile(result.waits, 50)),
                    _seconds(percentile(result.waits, 99)),
                ]
            )
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            cells = [str(row[0]).ljust(widths[0])]
            cells += [
                str(cell).rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
            ]
            lines.append("  " + "  ".join(cells).rstrip())
        if outcome.skipped:
            lines.append(
                "  not in this config (skipped): "
                + ", ".join(f"{m} ({n})" for m, n in sorted(outcome.skipped.items()))
            )
    return "\n".join(lines) + "\n"
