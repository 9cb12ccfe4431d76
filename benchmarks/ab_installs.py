"""Two installations of fastadam side by side, in alternating processes.

    python benchmarks/ab_installs.py A B [--runs N] [-- python -m fastadam.bench's options]

A and B are each a Python interpreter, optionally followed by ``:FOLDER`` to put
on its PYTHONPATH (a checkout built in place), say a virtual environment with a
wheel installed against this checkout.  Unlike benchmarks/ab_builds.py, which
loads two builds into one process, each run here is a fresh process, so the two
may carry different OpenMP runtimes (two libgomp builds share one soname, and a
process loads only the first).  The runs alternate A B A B ..., so machine drift
hits both alike; printed per row: each side's median over its runs of the speed
report's median time per step, and the ratio A/B.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def run(spec, bench_args, out):
    python, _, folder = spec.partition(":")
    env = dict(os.environ)
    if folder:
        env["PYTHONPATH"] = folder
    else:
        env.pop("PYTHONPATH", None)
    # From an empty folder, so that an interpreter without FOLDER imports its installed package.
    subprocess.run([python, "-m", "fastadam.bench", *bench_args, "--json", out,
                    "--plot", out.replace(".json", ".png")],
                   check=True, env=env, cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL)
    with open(out) as f:
        report = json.load(f)
    rows = {(r["impl"], r["size"], r["threads"]): r["median_s"] for r in report["results"]}
    rows.update({(r["impl"], "model", r["threads"]): r["median_s"]
                 for r in report.get("model_shaped", []) if "median_s" in r})
    return rows, report["machine"]


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--runs", type=int, default=3, help="processes per side")
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    bench_args = argv[cut + 1:]  # after --: the speed report's options
    times = {"A": {}, "B": {}}
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.runs):
            for side, spec in (("A", args.a), ("B", args.b)):
                rows, machine = run(spec, bench_args, os.path.join(folder, f"{side}{i}.json"))
                for key, t in rows.items():
                    times[side].setdefault(key, []).append(t)
                print(f"run {i + 1}/{args.runs} {side}: {spec}", file=sys.stderr, flush=True)
    print(f"A = {args.a}\nB = {args.b}\nmachine (B): {machine}")
    print(f"{'implementation':22s} {'size':>9s} {'threads':>7s} {'A us/step':>11s} {'B us/step':>11s} {'A/B':>6s}")
    for key in sorted(set(times["A"]) & set(times["B"]), key=lambda k: (k[0], str(k[1]).zfill(12), k[2])):
        a, b = statistics.median(times["A"][key]), statistics.median(times["B"][key])
        print(f"{key[0]:22s} {key[1]!s:>9s} {key[2]!s:>7s} {a * 1e6:11.2f} {b * 1e6:11.2f} {a / b:6.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
