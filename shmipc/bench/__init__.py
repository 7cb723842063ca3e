"""`shmipc bench`: shmipc against pipes, multiprocessing and (when installed)
faster-fifo and pyzmq, measured in the same run on this machine.

    from shmipc.bench import Options, run, format_report
    report = run(Options(sizes=[64, 1 << 20], repeat=3))
    print(format_report(report))

Modules: ``transports`` (the adapters), ``workloads`` (what runs inside a
measurement process, and how receivers verify), ``runner`` (one fresh forked
process per measurement, with a hard timeout), ``report`` (tables, JSON,
chart).
"""
from __future__ import annotations

from shmipc.bench.report import format_report, markdown_tables, plot, write_json
from shmipc.bench.runner import DEFAULT_SIZES, WORKLOADS, Options, parse_size, plan, run
from shmipc.bench.transports import TRANSPORTS, get_transports

__all__ = [
    "DEFAULT_SIZES", "WORKLOADS", "TRANSPORTS", "Options", "format_report", "get_transports",
    "markdown_tables", "parse_size", "plan", "plot", "run", "write_json",
]
