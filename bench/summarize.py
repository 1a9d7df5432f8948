#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Summarizes a bkn_bench JSON file (--benchmark_out=FILE --benchmark_out_format=json run with
--benchmark_repetitions=N): one row per benchmark with the median real time, its spread (cv),
the median minimal-bytes rate and that rate as a percentage of the copy and triad baselines of
the same shape from the same run. Standard library only.

    bench/summarize.py run.json [--filter REGEX] [--markdown]
"""
import argparse
import json
import re
import sys


def shape_of(name):
    """'forward_BN/eigen:t2/NCHW/32x64x56x56/gs=2' -> '32x64x56x56'; 'copy/2x1024' -> '2x1024'."""
    parts = name.split("/")
    if parts[0] in ("copy", "triad"):
        return parts[1]
    return parts[3] if len(parts) > 3 else None


def sort_key(name):
    """Shape, then layout and grouping, then baselines first, then kind and backend."""
    parts = name.split("/")
    if parts[0] in ("copy", "triad"):
        return (parts[1], "", "", 0, parts[0], "")
    kind, backend, layout, shape = parts[:4]
    group = parts[4] if len(parts) > 4 else ""
    return (shape, layout, group, 1, kind, backend)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json_file")
    ap.add_argument("--filter", default="", help="regex on the benchmark name")
    ap.add_argument("--markdown", action="store_true", help="a Markdown table")
    args = ap.parse_args()

    with open(args.json_file) as f:
        data = json.load(f)
    rows = {}
    for b in data["benchmarks"]:
        agg = b.get("aggregate_name")
        if agg not in ("median", "cv", None):
            continue
        name = b.get("run_name", b["name"])
        name = re.sub(r"/real_time$", "", name)
        row = rows.setdefault(name, {})
        if agg == "cv":
            row["cv"] = b["real_time"]  # a fraction for the cv aggregate
        elif agg == "median" or "time" not in row:  # a run without repetitions has no median
            unit = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}[b.get("time_unit", "ns")]
            row["time_us"] = b["real_time"] * unit
            row["gbps"] = b.get("bytes_per_second", 0.0) / 1e9

    baseline = {}
    for name, row in rows.items():
        kind = name.split("/")[0]
        if kind in ("copy", "triad"):
            baseline[(kind, shape_of(name))] = row["gbps"]

    pattern = re.compile(args.filter)
    out = []
    for name, row in rows.items():
        if not pattern.search(name):
            continue
        shape = shape_of(name)
        pct = []
        for kind in ("copy", "triad"):
            base = baseline.get((kind, shape))
            pct.append(f"{100 * row['gbps'] / base:.0f}%" if base else "-")
        cv = f"{100 * row['cv']:.0f}%" if "cv" in row else "-"
        out.append((name, f"{row['time_us']:.1f}", cv, f"{row['gbps']:.2f}", pct[0], pct[1]))

    out.sort(key=lambda r: sort_key(r[0]))
    header = ("benchmark", "median us", "cv", "GB/s (minimal bytes)", "% copy", "% triad")
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(" --- " for _ in header) + "|")
        for r in out:
            print("| `" + r[0] + "` | " + " | ".join(r[1:]) + " |")
    else:
        width = max([len(header[0])] + [len(r[0]) for r in out])
        print(f"{header[0]:<{width}}  " + "  ".join(f"{h:>10}" for h in header[1:]))
        for r in out:
            print(f"{r[0]:<{width}}  " + "  ".join(f"{v:>10}" for v in r[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
