"""The thread planner after a noisy start: does a moment of load decide the steps after it?

    python benchmarks/planner_recovery.py [--size 1M] [--trials 3] [--load-steps 30] [--steps 300]
                                          [--busy N]

Each trial makes two new optimizers (num_threads=None, the planner's choice), in
an order that alternates between trials:

  quiet   its first steps and the timed ones with the machine as it is;
  noisy   its first ``--load-steps`` steps while ``--busy`` processes (default: one
          per usable CPU) spin; the processes are then stopped, and the steps are timed.

Both then take ``--steps`` timed steps.  Printed per trial and scenario: the
median step, the median of the last 100 (after the planner has had its chance
to re-plan), the planner's choice when the load stopped and at the end, and the
first step after the load at which the choice was the quiet run's final one.  A
planner that kept a choice made under load shows as a noisy median well above
the quiet one; one that recovers, as equal medians over the last 100 steps.
"""
import argparse
import statistics
import subprocess
import sys
import time

import numpy as np

import fastadam
from fastadam import bench


def new_step(n):
    """A float32 step of ``n`` parameters on the planner's thread count, and a function
    that says the count the planner has chosen (for steps outside a trial)."""
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n, dtype=np.float32)
    g = (rng.standard_normal(n, dtype=np.float32) * 1e-2).astype(np.float32)
    opt = fastadam.Adam([p], lr=1e-3)
    grads = [g]
    opt.step(grads)  # the first step makes the plan

    def chosen():
        plan = opt._plan  # the compiled plan's planner (benchmarks only)
        return getattr(plan, "chosen_threads", None)

    return (lambda: opt.step(grads)), chosen


class BusyProcesses:
    """``with BusyProcesses(k):`` k processes spinning on the CPU for the block."""

    def __init__(self, count):
        self.count = count

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                      for _ in range(self.count)]
        time.sleep(0.2)  # let them start spinning
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()
        return False


def timed_steps(step, chosen, steps):
    """Per step: (seconds, the planner's choice after it)."""
    out = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        out.append((time.perf_counter() - started, chosen()))
    return out


def run_scenario(n, busy, load_steps, steps):
    """The choice after the first ``load_steps`` steps (with ``busy`` processes spinning
    while they run) and the timed steps after them."""
    step, chosen = new_step(n)
    if busy:
        with BusyProcesses(busy):
            for _ in range(load_steps):
                step()
    else:
        for _ in range(load_steps):
            step()
    return chosen(), timed_steps(step, chosen, steps)


def summary(label, after_load, timed, target):
    seconds = [s for s, _ in timed]
    back = next((i + 1 for i, (_, c) in enumerate(timed) if c == target), None)
    other = sum(c != target for _, c in timed)
    return (f"  {label:6s} median {statistics.median(seconds) * 1e6:8.1f} us   last 100 "
            f"{statistics.median(seconds[-100:]) * 1e6:8.1f} us   chosen after the load "
            f"{after_load}, the quiet choice ({target}) from step "
            f"{back if back is not None else 'never'}, {other} steps on another count")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1M")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--load-steps", type=int, default=30)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--busy", type=int, default=bench.all_threads(),
                        help="processes spinning during the noisy start")
    args = parser.parse_args(argv)
    n = {v: k for k, v in bench.LABELS.items()}.get(args.size) or int(args.size)
    print(f"# command: python benchmarks/planner_recovery.py {' '.join(argv or sys.argv[1:])}")
    print(f"machine: {bench.machine()}")
    print(f"{args.size} float32 parameters, num_threads=None; {args.busy} busy processes "
          f"during the noisy start's first {args.load_steps} steps")
    for trial in range(args.trials):
        order = (False, True) if trial % 2 == 0 else (True, False)
        results = {noisy: run_scenario(n, args.busy if noisy else 0, args.load_steps, args.steps)
                   for noisy in order}
        target = results[False][1][-1][1]
        print(f"trial {trial + 1}")
        for noisy in (False, True):
            print(summary("noisy" if noisy else "quiet", *results[noisy], target))


if __name__ == "__main__":
    main()
