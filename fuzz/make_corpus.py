#!/usr/bin/env python3
"""Regenerates fuzz/corpus/ (fuzz/README.md, "The corpus").

    python3 fuzz/make_corpus.py build-fuzz/layer_fuzzer [--seconds 60] [--out fuzz/corpus]

1. Writes the hand-made seeds (SEEDS below, files seed-*): one small layer per transition
   kind, mode and inference kind, in-place views, special values, an invalid geometry, and
   the reproducers of the fuzzer's findings.
2. Fuzzes for --seconds from them.
3. Minimizes everything with libFuzzer's -merge=1 on coverage edges (-use_counters=0).
4. Keeps the seeds, then greedily the merged inputs that add the most edges not yet covered,
   up to --max files (40): libFuzzer's own minimal set is ~250 tiny files, each owning a few
   edges (a validation message, a branch), which a minute of fuzzing in CI finds again.

A seed is the 32-byte header of fuzz/layer_fuzzer.cpp (byte i is decision i, taken modulo its
number of choices; 0 is the plain valid choice) and, for some, tail bytes with values. Without
tail bytes the values come from the PRNG seeded by bytes 30-31: well-conditioned data.
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

# Header positions, as in the enum `header` of layer_fuzzer.cpp.
(BATCH, CHANNELS, HEIGHT, WIDTH, LAYOUT_X, LAYOUT_Y, LAYOUT_DY, LAYOUT_DX, SHAPE_DEFECT, GROUP,
 MODE, TRAINING, EPSILON, MOMENTUM, FIXED_GAIN, SKIP, FLAGS, TRANSITION, TRANSITION_DEFECT,
 IN_CHANNELS, KERNEL, STRIDE, PAD, PRIOR, GAIN, AFFINE, NOISE, RUNNING, GRADS, GRAD_DEFECT,
 SEED_LO, SEED_HI) = range(32)

FULL = 2  # MODE choice
ONE_PIXEL = {HEIGHT: 1, WIDTH: 1}  # pixels table {2, 1, 3, 4}: choice 1 is 1

SEEDS = {
    # transitions (diagonal mode, N=4 C=3 2x2, per-group prior, learned per-layer gain)
    "identity": {},
    "diagonal": {TRANSITION: 1},
    "dense": {TRANSITION: 2, IN_CHANNELS: 3},  # C' = 4
    "linear-relu": {TRANSITION: 3, IN_CHANNELS: 4, **ONE_PIXEL},
    "linear-custom": {TRANSITION: 7, IN_CHANNELS: 2, **ONE_PIXEL},
    "conv2d-relu-3x3-pad1": {TRANSITION: 5, IN_CHANNELS: 2, KERNEL: 2 + 3 * 2, PAD: 1 + 3 * 1},
    "conv2d-custom-stride2": {TRANSITION: 6, IN_CHANNELS: 6 + 1, KERNEL: 1 + 3 * 1, STRIDE: 3},
    # full covariance
    "full-dense": {MODE: FULL, TRANSITION: 2, IN_CHANNELS: 1},
    "full-linear-none": {MODE: FULL, TRANSITION: 4, IN_CHANNELS: 3, **ONE_PIXEL},
    # priors, gains, groups
    "no-prior-batchnorm": {PRIOR: 2},
    "shared-prior-groups-of-2": {PRIOR: 1, GROUP: 2},
    # inference
    "inference-running": {TRAINING: 2},
    "inference-chain-dense": {TRAINING: 3, TRANSITION: 2, IN_CHANNELS: 1},
    # layouts and aliasing
    "nhwc-in-place": {LAYOUT_X: 1, LAYOUT_Y: 3, LAYOUT_DX: 3},
    # special values in the tail: x starts NaN, +Inf, 1e30, denormal, repeats
    "check-finite-nan": ({FLAGS: 4, BATCH: 1, CHANNELS: 1, **ONE_PIXEL},
                         bytes([0xE0, 0x70, 0x00, 0x71, 0x00])),
    "huge-and-denormal-values": ({CHANNELS: 1, BATCH: 2},
                                 bytes([0xE3, 0xE5, 0xE4, 0xEA, 0x70, 0x10, 0xE6, 0xE9])),
    # invalid calls (must throw, nothing written)
    "invalid-transition-geometry": {TRANSITION: 5, TRANSITION_DEFECT: 7 + 8 * 3},
    # regressions (fuzz/README.md, "Findings"): a conv2d stride of 0 in inference from moving
    # averages (divided by zero), and workspace_size with a group size of -1 (returned 0)
    "regression-1-running-inference-stride0": {TRAINING: 2, TRANSITION: 5,
                                               TRANSITION_DEFECT: 7 + 8 * 1},
    "regression-2-workspace-size-negative-group": {GROUP: 6},
}


def encode(spec):
    tail = b""
    if isinstance(spec, tuple):
        spec, tail = spec
    header = bytearray(32)
    for pos, value in spec.items():
        header[pos] = value
    return bytes(header) + tail


def fuzzer_run(fuzzer, *args, cwd):
    subprocess.run([os.path.abspath(fuzzer), *args], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_control(path):
    """File names and coverage edges per file of a libFuzzer merge control file."""
    with open(path) as f:
        lines = f.read().splitlines()
    count = int(lines[0])
    files = lines[2:2 + count]
    edges = {}
    for line in lines[2 + count:]:
        if line.startswith("COV "):
            parts = line.split()
            edges[int(parts[1])] = set(map(int, parts[2:]))
    return files, edges


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fuzzer")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "corpus"))
    parser.add_argument("--max", type=int, default=40)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        seeds, run, merged = (os.path.join(tmp, d) for d in ("seeds", "run", "merged"))
        for d in (seeds, run, merged):
            os.makedirs(d)
        for name, spec in SEEDS.items():
            with open(os.path.join(seeds, "seed-" + name), "wb") as f:
                f.write(encode(spec))
        fuzzer_run(args.fuzzer, f"-max_total_time={args.seconds}", f"-artifact_prefix={tmp}/",
                   run, seeds, cwd=tmp)
        control = os.path.join(tmp, "control")
        fuzzer_run(args.fuzzer, "-merge=1", "-use_counters=0", f"-merge_control_file={control}",
                   merged, seeds, run, cwd=tmp)
        files, edges = read_control(control)
        everything = set().union(*edges.values())
        chosen = [i for i, f in enumerate(files) if os.path.basename(f).startswith("seed-")]
        covered = set().union(*(edges.get(i, set()) for i in chosen))
        while len(chosen) < args.max:
            best = max(edges, key=lambda i: (len(edges[i] - covered), -os.path.getsize(
                os.path.join(tmp, files[i]))))
            if not edges[best] - covered:
                break
            chosen.append(best)
            covered |= edges[best]

        if os.path.isdir(args.out):
            shutil.rmtree(args.out)
        os.makedirs(args.out)
        for i in chosen:
            src = os.path.join(tmp, files[i])
            name = os.path.basename(src)
            if not name.startswith("seed-"):
                with open(src, "rb") as f:
                    name = "fuzz-" + hashlib.sha1(f.read()).hexdigest()[:16]
            shutil.copyfile(src, os.path.join(args.out, name))
        total = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out))
        print(f"{args.out}: {len(chosen)} files ({len(SEEDS)} seeds), {total} bytes; "
              f"{len(covered)} of the {len(everything)} edges the merge found")


if __name__ == "__main__":
    sys.exit(main())
