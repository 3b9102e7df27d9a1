"""Picks per second of every selection algorithm: compiled class vs its reference twin.

    python loadtests/bench_picks.py [--backends 10,1000] [--repeat 5]

Columns (millions of picks per CPU-second, median of --repeat runs, each run at least
0.2 CPU-s; CPU time because the machines are shared and noisy, see NOTES.md):
  C loop        Algorithm.bench_pick: pick_c called in a C loop, no Python per pick.
                This is what the relay pays.
  C loop+churn  the same with conn_opened + conn_closed on each picked backend (the
                bookkeeping a connection drives; it is what a least-load heap costs).
  py pick()     the Python-level pick(key) method called from a Python loop.
  twin          the reference twin's pick(key) from a Python loop.
  x C/twin      C loop / twin;  x py/twin: py pick() / twin.
The pool: weights 100..1000 (x100 slow-start scale) all up; every backend holds a few
connections and has a response-time sample, so leastconn/lrt/p2c compare real loads;
the hash table is built before timing. A script, not a test: no assertion on speed.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from l4lb import _native  # noqa: E402
from l4lb.algorithms import ALGORITHMS, REFERENCES  # noqa: E402

MIN_CPU_SECONDS = 0.2


def build(cls, n):
    algo = cls(12345)
    for i in range(n):
        algo.add(f"backend-{i}", 100 * (1 + i % 10))
        algo.set_up(i, True)
        for _ in range(i % 4):
            algo.conn_opened(i)
        algo.observe_rt(i, 0.0005 + 0.0001 * (i % 7))
    algo.pick(0)                     # build whatever is built lazily (Maglev)
    return algo


def rate(run):
    """Picks per CPU-second of run(count), scaling count until a run takes long enough."""
    count = 256
    while True:
        start = time.process_time()
        run(count)
        spent = time.process_time() - start
        if spent >= MIN_CPU_SECONDS:
            return count / spent
        count *= 2 if spent < MIN_CPU_SECONDS / 8 else 1 + int(MIN_CPU_SECONDS / max(spent, 1e-6))


def python_loop(algo):
    def run(count):
        pick = algo.pick
        for key in range(count):
            pick(key)
    return run


def median_rate(run, repeat):
    return statistics.median(rate(run) for _ in range(repeat))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="10,1000")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    assert _native.__file__.endswith(".so"), "l4lb._native is not compiled"
    print(f"python {sys.version.split()[0]}, l4lb._native from {_native.__file__}")
    head = ("| algorithm | backends | C loop | C loop+churn | py pick() | twin "
            "| x C/twin | x py/twin |")
    print(head)
    print("|" + "---|" * 8)
    for n in (int(x) for x in args.backends.split(",")):
        for word, compiled_cls in ALGORITHMS.items():
            twin_cls = REFERENCES[word]
            compiled, twin = build(compiled_cls, n), build(twin_cls, n)
            c_loop = median_rate(lambda k: compiled.bench_pick(k, 0), args.repeat)
            churn = median_rate(lambda k: compiled.bench_pick(k, 0, True), args.repeat)
            py_call = median_rate(python_loop(compiled), args.repeat)
            ref = median_rate(python_loop(twin), max(1, args.repeat // 2))
            print(f"| {word} | {n} | {c_loop / 1e6:.2f} M | {churn / 1e6:.2f} M "
                  f"| {py_call / 1e6:.2f} M | {ref / 1e3:.1f} k | {c_loop / ref:,.0f} "
                  f"| {py_call / ref:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
