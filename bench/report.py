#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Renders docs/benchmarks.md and docs/benchmarks.png from a bkn_bench JSON run.

    bench/report.py RUN.json --meta META.json --out docs/benchmarks.md --png docs/benchmarks.png

RUN.json is Google Benchmark's output (--benchmark_out_format=json, with repetitions: the
medians are used); META.json is what tools/bench.sh records about the run (command, commit,
machine, load). The prose of the document is bench/benchmarks.md.in; this script fills in its
@TABLES@-style placeholders. Standard library only; the chart needs gnuplot (skipped, and said
so in the document, without it).
"""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

# ---- reading the run ----

KINDS = ["inference", "forward_BN", "backward_BN", "fwdbwd_BN"]
KIND_TITLES = {"inference": "inference", "forward_BN": "forward (training)",
               "backward_BN": "backward", "fwdbwd_BN": "forward + backward"}
METHODS = ["BKN-identity", "BKN-dense", "BKN-linear", "BKN-conv", "BKN-full"]
PEERS = ["onednn", "libtorch"]
LAYOUT_ORDER = {"NCHW": 0, "NHWC": 1, "NC": 2}
# eigen_backend::parallel_min_elements by default (the suite's eigen lines keep it): smaller
# tensors run on the calling thread whatever the thread count, unless they reach a quarter of it
# with statistics that pool at least PARALLEL_POOLED_VALUES values each (eigen_team).
PARALLEL_MIN_ELEMENTS = 1 << 18
PARALLEL_POOLED_VALUES = 64


def eigen_forks(kind, case):
    """Whether the Eigen backend's passes of this kind and case fork at 2 threads (eigen_team).
    Inference normalizes the whole batch at once, in any grouping."""
    layout, dims, gs = case.split("/")
    dims = [int(d) for d in dims.split("x")]
    elements = math.prod(dims)
    batch, pixels = dims[0], math.prod(dims[2:])
    group = batch if gs == "gs=all" or kind == "inference" else int(gs[3:])
    if elements >= PARALLEL_MIN_ELEMENTS:
        return True
    return (elements >= PARALLEL_MIN_ELEMENTS // 4
            and group * pixels >= PARALLEL_POOLED_VALUES)


def parse_name(name):
    """'forward_BN/eigen:t2/NCHW/32x64x56x56/gs=2' -> dict; baselines -> kind, shape."""
    name = re.sub(r"/real_time$", "", name)
    parts = name.split("/")
    if parts[0] in ("copy", "triad"):
        return {"kind": parts[0], "shape": parts[1]}
    if len(parts) != 5:
        return None
    line = parts[1]
    m = re.match(r"(.+):t(\d+)$", line)
    return {"kind": parts[0], "line": line, "backend": m.group(1) if m else line,
            "threads": int(m.group(2)) if m else 1, "layout": parts[2], "shape": parts[3],
            "gs": parts[4][3:], "case": "/".join(parts[2:])}


def load_run(path):
    """Median real time (us), median bytes/s and the spread of every benchmark."""
    with open(path) as f:
        data = json.load(f)
    rows = {}
    for b in data["benchmarks"]:
        agg = b.get("aggregate_name")
        if agg not in (None, "median", "cv"):
            continue
        if b.get("error_occurred"):
            rows.setdefault(re.sub(r"/real_time$", "", b.get("run_name", b["name"])), {})[
                "error"] = b.get("error_message", "error")
            continue
        name = re.sub(r"/real_time$", "", b.get("run_name", b["name"]))
        row = rows.setdefault(name, {})
        if agg == "cv":
            row["cv"] = b["real_time"]
            continue
        if agg is None and "time_us" in row and row.get("from_median"):
            continue
        unit = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}[b.get("time_unit", "ns")]
        if agg is None:  # single runs without aggregates: keep the smallest of repetitions
            if "time_us" in row and row["time_us"] <= b["real_time"] * unit:
                continue
        row["time_us"] = b["real_time"] * unit
        row["gbps"] = b.get("bytes_per_second", 0.0) / 1e9
        row["from_median"] = agg == "median"
    return data.get("context", {}), rows


class Run:
    def __init__(self, context, rows):
        self.context = context
        self.rows = rows
        self.parsed = {n: parse_name(n) for n in rows}
        self.copy = {}
        for n, p in self.parsed.items():
            if p and p["kind"] == "copy" and "gbps" in rows[n]:
                self.copy[p["shape"]] = rows[n]
        self.cases = sorted({p["case"] for p in self.parsed.values() if p and "case" in p},
                            key=case_key)

    def get(self, kind, line, case):
        r = self.rows.get(f"{kind}/{line}/{case}")
        return r if r and "time_us" in r else None

    def time(self, kind, line, case):
        r = self.get(kind, line, case)
        return r["time_us"] if r else None

    def pct_copy(self, kind, line, case):
        r = self.get(kind, line, case)
        shape = case.split("/")[1]
        base = self.copy.get(shape)
        if not r or not base or not base.get("gbps"):
            return None
        return 100.0 * r["gbps"] / base["gbps"]

    def lines(self):
        found = {p["line"] for p in self.parsed.values() if p and "line" in p}
        return sorted(found, key=line_key)

    def errors(self):
        return sorted((n, r["error"]) for n, r in self.rows.items() if "error" in r)


def case_key(case):
    layout, shape, gs = case.split("/")
    dims = [int(d) for d in shape.split("x")]
    elements = math.prod(dims)
    return (LAYOUT_ORDER.get(layout, 9), elements, dims, 0 if gs == "gs=all" else int(gs[3:]))


def line_key(line):
    order = ["eigen", "kokkos-serial", "kokkos-openmp", "reference", "onednn", "libtorch"]
    m = re.match(r"(.+):t(\d+)$", line)
    name, threads = (m.group(1), int(m.group(2))) if m else (line, 1)
    return (order.index(name) if name in order else 99, threads)


def case_label(case):
    layout, shape, gs = case.split("/")
    g = "" if gs == "gs=all" else f", groups of {gs[3:]}"
    return f"{layout} {shape}{g}"


def fmt_ratio(x):
    if x is None:
        return "-"
    if x < 0.1:
        return f"{x:.3f}"
    return f"{x:.2f}" if x < 10 else f"{x:.0f}"


def fmt_time(us):
    if us is None:
        return "-"
    if us < 10:
        return f"{us:.2f} us"
    if us < 1000:
        return f"{us:.0f} us"
    return f"{us / 1000:.2f} ms"


def fmt_pct(p):
    return "-" if p is None else f"{p:.0f}%"


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


# ---- the tables ----

def bkn_line(run, threads):
    return f"eigen:t{threads}"


def thread_counts(run):
    return sorted({p["threads"] for p in run.parsed.values()
                   if p and p.get("backend") == "eigen"})


def peers_present(run):
    return [p for p in PEERS if any(q and q.get("backend") == p for q in run.parsed.values())]


def peer_ratio_tables(run):
    """bkn / peer time ratios: < 1 means bkn is faster."""
    out = []
    peers = peers_present(run)
    if not peers:
        return "No peer was built into this run (oneDNN and libtorch both missing).\n"
    for t in thread_counts(run):
        header = ["case"]
        for k in KINDS:
            for p in peers:
                header.append(f"{KIND_TITLES[k]} / {p}")
        rows = []
        for case in run.cases:
            if case.split("/")[0] not in LAYOUT_ORDER:
                continue
            r = [case_label(case)]
            any_value = False
            for k in KINDS:
                mine = run.time(k, bkn_line(run, t), case)
                for p in peers:
                    other = run.time(k, f"{p}:t{t}", case)
                    v = mine / other if mine and other else None
                    any_value |= v is not None
                    r.append(fmt_ratio(v))
            if any_value:
                rows.append(r)
        out.append(f"**{t} thread{'s' if t > 1 else ''}** (bkn = `eigen:t{t}`; time of bkn "
                   f"over time of the peer, below 1: bkn is faster):\n\n" + table(header, rows))
    return "\n\n".join(out) + "\n"


def bkn_bn_tables(run):
    out = []
    for t in thread_counts(run):
        line = bkn_line(run, t)
        methods = [m for m in METHODS
                   if any(run.time(f"forward_{m}", line, c) for c in run.cases)]
        if not methods:
            continue
        header = ["case"] + [f"{m} {d}" for m in methods for d in ("fwd", "bwd")]
        rows = []
        for case in run.cases:
            r = [case_label(case)]
            any_value = False
            for m in methods:
                for d in ("forward", "backward"):
                    bn = run.time(f"{d}_BN", line, case)
                    bk = run.time(f"{d}_{m}", line, case)
                    v = bk / bn if bn and bk else None
                    any_value |= v is not None
                    r.append(fmt_ratio(v))
            if any_value:
                rows.append(r)
        out.append(f"**`{line}`** (time of the BKN layer over time of bkn's BN layer, same "
                   f"shape and grouping):\n\n" + table(header, rows))
    if not out:
        return "No BKN benchmark in this run.\n"
    return "\n\n".join(out) + "\n"


def copy_tables(run):
    out = []
    lines = [l for l in run.lines()]
    for k in KINDS:
        present = [l for l in lines if any(run.time(k, l, c) for c in run.cases)]
        header = ["case", "copy"] + [f"`{l}`" for l in present]
        rows = []
        for case in run.cases:
            shape = case.split("/")[1]
            base = run.copy.get(shape)
            r = [case_label(case), fmt_time(base["time_us"]) if base else "-"]
            vals = [fmt_pct(run.pct_copy(k, l, case)) for l in present]
            if any(v != "-" for v in vals):
                rows.append(r + vals)
        out.append(f"**{KIND_TITLES[k]}**, % of copy bandwidth:\n\n" + table(header, rows))
    return "\n\n".join(out) + "\n"


def kernel_table(run):
    kernels = ["moments", "affine", "sums", "affine_v"]
    lines = [l for l in run.lines() if not l.startswith(("onednn", "libtorch"))]
    header = ["case"] + [f"{k} `{l}`" for k in kernels for l in lines
                         if any(run.time(k, l, c) for c in run.cases)]
    cols = [(k, l) for k in kernels for l in lines if any(run.time(k, l, c) for c in run.cases)]
    rows = []
    for case in run.cases:
        if case.split("/")[2] != "gs=all":
            continue
        vals = [fmt_pct(run.pct_copy(k, l, case)) for k, l in cols]
        if any(v != "-" for v in vals):
            rows.append([case_label(case)] + vals)
    return table(header, rows) + "\n"


def times_table(run):
    lines = run.lines()
    out = []
    for k in KINDS:
        present = [l for l in lines if any(run.time(k, l, c) for c in run.cases)]
        header = ["case"] + [f"`{l}`" for l in present]
        rows = []
        for case in run.cases:
            vals = [fmt_time(run.time(k, l, case)) for l in present]
            if any(v != "-" for v in vals):
                rows.append([case_label(case)] + vals)
        out.append(f"**{KIND_TITLES[k]}**, median time per call:\n\n" + table(header, rows))
    return "\n\n".join(out) + "\n"


def memory_table(run):
    """The read-only sweep (read/<size>): GB/s per working set, one thread."""
    rows = []
    for name, r in run.rows.items():
        m = re.match(r"read/(\d+)(KiB|MiB)$", name)
        if m and r.get("gbps"):
            size = int(m.group(1)) * (1024 if m.group(2) == "KiB" else 1024 * 1024)
            rows.append((size, f"{m.group(1)} {m.group(2)}", f"{r['gbps']:.0f} GB/s"))
    if not rows:
        return "(Not in this run.)\n"
    rows.sort()
    return ("Read bandwidth by working set (`read/<size>`: the same buffer read again and "
            "again, one thread):\n\n" + table(["working set", "read"], [[a, b] for _, a, b in rows])
            + "\n")


def threads_table(run):
    ts = thread_counts(run)
    if len(ts) < 2:
        return "Only one thread count in this run.\n"
    t1, t2 = ts[0], ts[-1]
    header = ["case"] + [KIND_TITLES[k] for k in KINDS]
    rows = []
    for case in run.cases:
        r = [case_label(case)]
        vals = []
        for k in KINDS:
            a, b = run.time(k, f"eigen:t{t1}", case), run.time(k, f"eigen:t{t2}", case)
            vals.append(fmt_ratio(a / b if a and b else None))
        if any(v != "-" for v in vals):
            rows.append(r + vals)
    return (f"Time on {t1} thread over time on {t2} threads (`eigen`; above 1: the second "
            f"thread helps):\n\n" + table(header, rows) + "\n")


# ---- the goals of issue #6 ----

def goals(run):
    """Each goal: (goal, measured, verdict)."""
    out = []
    peers = peers_present(run)
    ts = thread_counts(run)

    def worst(values):
        values = [v for v in values if v[0] is not None]
        return max(values) if values else (None, "")

    def best(values):
        values = [v for v in values if v[0] is not None]
        return min(values) if values else (None, "")

    for t in ts:
        line = bkn_line(run, t)
        # NCHW and NC: fwd+bwd >= 3x faster than the faster peer.
        speedups, nhwc = [], []
        for case in run.cases:
            layout = case.split("/")[0]
            mine = run.time("fwdbwd_BN", line, case)
            fastest = [run.time(k, f"{p}:t{t}", case) for p in peers for k in ["fwdbwd_BN"]]
            fastest = [f for f in fastest if f]
            if not mine or not fastest:
                continue
            if layout in ("NCHW", "NC"):
                speedups.append((min(fastest) / mine, case_label(case)))
        for case in run.cases:
            if case.split("/")[0] != "NHWC":
                continue
            for k in KINDS:
                mine, other = run.time(k, line, case), run.time(k, f"onednn:t{t}", case)
                if mine and other:
                    nhwc.append((mine / other, f"{KIND_TITLES[k]}, {case_label(case)}"))
        if speedups:
            v, where = best(speedups)
            out.append((f"NCHW and NC: BN forward + backward >= 3x faster than the faster peer "
                        f"({t} thread{'s' if t > 1 else ''})",
                        f"smallest speed-up {v:.2f}x ({where}); "
                        f"{sum(1 for s, _ in speedups if s >= 3)} of {len(speedups)} cases reach 3x",
                        "met" if v >= 3 else "not met"))
        if nhwc:
            v, where = worst(nhwc)
            out.append((f"NHWC: at least as fast as oneDNN, every BN kind "
                        f"({t} thread{'s' if t > 1 else ''})",
                        f"worst bkn/oneDNN time ratio {v:.2f} ({where}); "
                        f"{sum(1 for s, _ in nhwc if s <= 1)} of {len(nhwc)} cases at or below 1",
                        "met" if v <= 1 else "not met"))
    # Bandwidth on tensors >= 8 MB: judged on whole-batch BN; statistics groups of 2 or 4
    # samples (per-channel work comparable to the tensor's) are reported beside it.
    for k, target in (("forward_BN", 45), ("inference", 85)):
        vals, grouped = [], []
        for case in run.cases:
            shape = case.split("/")[1]
            if math.prod(int(d) for d in shape.split("x")) * 4 < 8e6:
                continue
            for t in ts:
                p = run.pct_copy(k, bkn_line(run, t), case)
                if p is None:
                    continue
                (vals if case.endswith("gs=all") else grouped).append(
                    (p, f"{case_label(case)}, {t} thr."))
        if vals:
            v, where = best(vals)
            note = ""
            if grouped and k != "inference":
                g, gwhere = best(grouped)
                note = f"; in statistics groups the lowest is {g:.0f}% ({gwhere})"
            out.append((f"{KIND_TITLES[k]} at >= {target}% of copy bandwidth on tensors >= 8 MB, "
                        f"every layout (whole batch)",
                        f"lowest {v:.0f}% ({where}); {sum(1 for p, _ in vals if p >= target)} of "
                        f"{len(vals)} at or above{note}", "met" if v >= target else "not met"))
    tiny = run.time("forward_BN", "eigen:t1", "NC/2x1024/gs=all")
    if tiny:
        out.append(("under 2 us per forward call on (2, 1024)", f"{tiny:.2f} us (`eigen:t1`)",
                    "met" if tiny < 2 else "not met"))
    for m in ("BKN-identity", "BKN-dense"):
        vals = []
        for case in run.cases:
            for d in ("forward", "backward"):
                bn, bk = run.time(f"{d}_BN", "eigen:t1", case), run.time(f"{d}_{m}", "eigen:t1",
                                                                          case)
                if bn and bk:
                    vals.append((bk / bn, f"{d}, {case_label(case)}"))
        if vals:
            v, where = worst(vals)
            out.append((f"{m} within 1.05x of bkn's BN (`eigen:t1`)",
                        f"worst {v:.2f}x ({where}); {sum(1 for r, _ in vals if r <= 1.05)} of "
                        f"{len(vals)} within", "met" if v <= 1.05 else "not met"))
    if len(ts) >= 2:
        vals, one_thread, beyond = [], 0, []
        for case in run.cases:
            for k in KINDS + ["forward_BKN-identity", "backward_BKN-identity"]:
                lo, hi = f"eigen:t{ts[0]}", f"eigen:t{ts[-1]}"
                a, b = run.time(k, lo, case), run.time(k, hi, case)
                if not (a and b):
                    continue
                vals.append((b / a, f"{k}, {case_label(case)}"))
                if b <= a:
                    continue
                # Tensors the Eigen backend does not fork run the same one-thread code at both
                # counts: their ratio is the run-to-run spread.
                if not eigen_forks(k, case):
                    one_thread += 1
                    continue
                spread = math.hypot(run.get(k, lo, case).get("cv", 0),
                                    run.get(k, hi, case).get("cv", 0))
                if b / a > 1 + 2 * spread:
                    beyond.append((b / a, f"{k}, {case_label(case)}"))
        if vals:
            v, where = worst(vals)
            above = sum(1 for r, _ in vals if r > 1.0)
            detail = ""
            if above:
                detail = (f"; of the {above} above 1, {one_thread} run the same one-thread code at "
                          f"both counts (tensors the backend does not fork) and "
                          f"{len(beyond)} {'is' if len(beyond) == 1 else 'are'} slower by more "
                          f"than twice their repetitions' spread")
                if beyond:
                    bv, bwhere = worst(beyond)
                    detail += f" (worst {bv:.2f}, {bwhere})"
            out.append((f"{ts[-1]} threads never slower than {ts[0]} (`eigen`)",
                        f"worst t{ts[-1]}/t{ts[0]} time ratio {v:.2f} ({where}); "
                        f"{len(vals) - above} of {len(vals)} at or below 1{detail}",
                        "met" if v <= 1.0 else "not met"))
    return out


def goals_table(run):
    rows = [[g, m, f"**{v}**" if v == "not met" else v] for g, m, v in goals(run)]
    return table(["goal (issue #6)", "measured in this run", "verdict"], rows) + "\n"


# ---- the chart ----

def chart(run, png):
    """Grouped bars: training forward and forward + backward, % of copy, one thread."""
    gnuplot = shutil.which("gnuplot")
    if not gnuplot:
        return "gnuplot not found: no chart was drawn."
    lines = ["eigen:t1"] + [f"{p}:t1" for p in peers_present(run)]
    cases = [c for c in run.cases if c.endswith("gs=all") and run.time("forward_BN", "eigen:t1", c)]
    with tempfile.TemporaryDirectory() as tmp:
        dat = os.path.join(tmp, "data.dat")
        with open(dat, "w") as f:
            for kind in ("forward_BN", "fwdbwd_BN"):
                f.write(f"# {kind}\n\"case\" " + " ".join(f"\"{l}\"" for l in lines) + "\n")
                for c in cases:
                    vals = [run.pct_copy(kind, l, c) for l in lines]
                    label = case_label(c).replace(" ", "\\n", 1)  # layout above the shape
                    f.write(f'"{label}" ' +
                            " ".join("0" if v is None else f"{v:.1f}" for v in vals) + "\n")
                f.write("\n\n")
        titles = {"eigen:t1": "bkn (eigen, 1 thread)", "onednn:t1": "oneDNN (1 thread)",
                  "libtorch:t1": "libtorch (1 thread)"}
        plots = []
        script = [
            f"set terminal pngcairo size 1400,900 font ',10'",
            f"set output '{png}'",
            "set multiplot layout 2,1 title 'Batch normalization, % of a same-size memcpy "
            "(higher is better), whole batch, 1 thread'",
            "set style data histograms", "set style histogram clustered gap 1",
            "set style fill solid 0.9 border -1", "set boxwidth 0.9", "set grid ytics",
            "set ylabel '% of copy bandwidth'", "set yrange [0:*]", "set key top left",
            "set xtics font ',8'",
        ]
        for index, title in ((0, "training forward"), (1, "forward + backward")):
            script.append(f"set title '{title}'")
            cols = ", ".join(
                f"'{dat}' index {index} using {j + 2}:xtic(1) title '{titles.get(l, l)}'"
                if j == 0 else f"'' index {index} using {j + 2} title '{titles.get(l, l)}'"
                for j, l in enumerate(lines))
            script.append(f"plot {cols}")
        script.append("unset multiplot")
        gp = os.path.join(tmp, "chart.gp")
        with open(gp, "w") as f:
            f.write("\n".join(script) + "\n")
        result = subprocess.run([gnuplot, gp], capture_output=True, text=True)
        if result.returncode != 0:
            return "gnuplot failed: " + result.stderr.strip().splitlines()[-1]
    return None


# ---- the document ----

def machine_section(meta, context):
    m = meta.get("machine", {})
    items = [
        ("date", meta.get("date", context.get("date", "?"))),
        ("commit", meta.get("commit", "?")),
        ("CPU", f"{m.get('cpu', '?')}; {context.get('num_cpus', '?')} CPUs at "
                f"{context.get('mhz_per_cpu', '?')} MHz (as Google Benchmark reads it)"
                + (f"; widest vector instructions: {m['isa']} (/proc/cpuinfo)" if "isa" in m
                   else "")),
        ("caches", m.get("caches", "?")),
        ("load average", f"{meta.get('load_before', '?')} before, {meta.get('load_after', '?')} "
                         f"after the run"),
        ("compiler and flags", f"{m.get('compiler', '?')}; bkn_bench built "
                               f"{context.get('bkn_build', '?')}"),
        ("bkn lines", context.get("bkn_backends", "?")),
        ("peers", ", ".join(f"{p} {context[p]}" for p in PEERS if p in context) or "none"),
        ("Kokkos", context.get("kokkos", "not built")),
        ("threads", f"1 and {context.get('bkn_threads', '?')}; OMP_WAIT_POLICY="
                    f"{meta.get('omp_wait_policy', 'unset')}"),
        ("statistics", f"median of {meta.get('repetitions', '?')} repetitions, "
                       f"min time {meta.get('min_time', '?')} s each, repetitions randomly "
                       f"interleaved"),
        ("benchmarks", f"{meta.get('count', '?')} in {meta.get('duration', '?')}"),
    ]
    if meta.get("note"):
        items.append(("conditions", meta["note"]))
    return "\n".join(f"- **{k}**: {v}" for k, v in items) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--meta", required=True)
    ap.add_argument("--template", default=os.path.join(os.path.dirname(__file__),
                                                        "benchmarks.md.in"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--png", required=True)
    args = ap.parse_args()

    context, rows = load_run(args.run)
    run = Run(context, rows)
    with open(args.meta) as f:
        meta = json.load(f)
    with open(args.template) as f:
        doc = f.read()

    failure = chart(run, os.path.abspath(args.png))
    errors = run.errors()
    substitutions = {
        "@MACHINE@": machine_section(meta, context),
        "@COMMAND@": meta.get("command", "?"),
        "@GOALS@": goals_table(run),
        "@PEERS@": peer_ratio_tables(run),
        "@BKN_BN@": bkn_bn_tables(run),
        "@COPY@": copy_tables(run),
        "@KERNELS@": kernel_table(run),
        "@THREADS@": threads_table(run),
        "@MEMORY@": memory_table(run),
        "@TIMES@": times_table(run),
        "@CHART@": (f"![% of copy bandwidth](benchmarks.png)\n" if not failure else
                    f"(No chart: {failure})\n"),
        "@ERRORS@": ("None: every benchmark ran and every peer's check against bkn's "
                     "reference passed.\n" if not errors else
                     "\n".join(f"- `{n}`: {e}" for n, e in errors) + "\n"),
    }
    for key, value in substitutions.items():
        doc = doc.replace(key, value.rstrip("\n"))
    with open(args.out, "w") as f:
        f.write(doc)
    print(f"report: wrote {args.out}" + ("" if failure else f" and {args.png}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
