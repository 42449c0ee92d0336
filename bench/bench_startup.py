"""Start-up time of the CLI: `aerialseg --help` and the torch-free stages' --help, vs importing torch.

Prints the median wall time of each command over --runs fresh processes (target: --help under 0.5 s on an
idle machine) and which heavy modules the command imported.  Usage: python bench/bench_startup.py [--runs 5]
"""

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    "aerialseg --help": "import sys; sys.argv = ['aerialseg', '--help']; from aerialseg.cli import main; main()",
    "aerialseg label-to-mask --help": ("import sys; sys.argv = ['aerialseg', 'label-to-mask', '--help']; "
                                       "from aerialseg.cli import main; main()"),
    "aerialseg tiles --help": "import sys; sys.argv = ['aerialseg', 'tiles', '--help']; from aerialseg.cli import main; main()",
    "import torch (reference)": "import torch",
    "import aerialseg.models (reference)": "import aerialseg.models",
}


def wall(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    print(f"{'command':40s} {'median s':>9s} {'min s':>7s}")
    for name, code in CASES.items():
        times = [wall(code) for _ in range(runs)]
        print(f"{name:40s} {statistics.median(times):9.3f} {min(times):7.3f}")


if __name__ == "__main__":
    main()
