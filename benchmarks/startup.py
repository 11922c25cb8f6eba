"""How long each command takes to answer `--help` and a bad flag: the time a user waits before anything runs.

Each command runs as `python -m <module>` in a fresh process from the root of
a checkout (its own `nfnet_keras` first on the path), `--repeats` times, the
checkouts interleaved so that both see the same load; the median wall time is
reported. Give `--baseline PATH` (another checkout, e.g. a `git worktree` of an
older commit) to measure both in one run and print the ratio. Which packages a
command imports is pinned by `tests/test_startup.py`, not measured here.

Usage:
    python -m benchmarks.startup [--baseline ../old-checkout] [--repeats 5]
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("nfnet_keras.fit", "nfnet_keras.evaluate", "nfnet_keras.predict", "nfnet_keras.export",
            "nfnet_keras.serving", "nfnet_keras.tuner.grid")
CASES = {"help": ["--help"], "bad_flag": ["--no-such-flag"]}
def run_once(checkout, module, flags):
    """(seconds, exit status) of one `python -m module flags` in `checkout`."""
    env = {**os.environ, "PYTHONPATH": checkout}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", module, *flags], cwd=checkout, env=env, capture_output=True,
                          timeout=300)
    return time.perf_counter() - start, done.returncode


def measure(checkouts, repeats):
    """{checkout: {module: {case: {...}}}}, the checkouts and commands interleaved in every round."""
    samples = {c: {m: {case: [] for case in CASES} for m in COMMANDS} for c in checkouts}
    seen = {}
    for _ in range(repeats):
        for module in COMMANDS:
            for case, flags in CASES.items():
                for checkout in checkouts:
                    seconds, code = run_once(checkout, module, flags)
                    samples[checkout][module][case].append(seconds)
                    seen[(checkout, module, case)] = code
    return {c: {m: {case: dict(median_s=round(statistics.median(v), 3), min_s=round(min(v), 3),
                               exit_status=seen[(c, m, case)])
                    for case, v in cases.items()} for m, cases in mods.items()} for c, mods in samples.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="another checkout to measure in the same run (e.g. an older commit)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command and case (default: 5)")
    parser.add_argument("--out-dir", default=common.RESULTS_DIR, help="where startup.json goes")
    args = parser.parse_args(argv)
    checkouts = [ROOT] + ([os.path.abspath(args.baseline)] if args.baseline else [])
    results = measure(checkouts, args.repeats)
    rows = []
    for module in COMMANDS:
        for case in CASES:
            now = results[ROOT][module][case]
            row = {"command": f"python -m {module}", "case": case, "seconds": now["median_s"]}
            if args.baseline:
                before = results[checkouts[1]][module][case]
                speed_up = round(before["median_s"] / now["median_s"], 1)
                row.update({"baseline s": before["median_s"], "speed-up": speed_up})
            rows.append(row)
    print(common.format_table(rows, [(key, key) for key in rows[0]]))
    payload = dict(benchmark="startup", repeats=args.repeats, checkout=ROOT, baseline=checkouts[1:] or None,
                   machine=common.machine_info(), results=results, rows=rows)
    print("wrote", common.write_json("startup", payload, out_dir=args.out_dir))


if __name__ == "__main__":
    main()
