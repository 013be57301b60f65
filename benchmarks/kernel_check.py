"""Time a full check of one kernel over all four dtypes (target, issue 5: <= 3 s on CPU).

Runs each kernel's full check --repeats times (default 5) and prints the median
beside the target.
"""
import argparse
import statistics
import time

from nanlab.kernels import check
from nanlab.kernels import examples

TARGET_S = 3.0
KERNELS = [("torch_cross_entropy", "cross_entropy"), ("naive_softmax_cross_entropy", "cross_entropy"),
           ("torch_log_softmax", "log_softmax"), ("torch_binary_cross_entropy_with_logits",
                                                   "binary_cross_entropy_with_logits")]


def whole(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=whole, default=5, help="full checks of each kernel; the median is printed "
                                                                 "(default 5)")
    args = parser.parse_args()
    check(examples.torch_cross_entropy, kind="cross_entropy")  # warm up
    for name, kind in KERNELS:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            report = check(getattr(examples, name), kind=kind)
            times.append(time.perf_counter() - start)
        med = statistics.median(times)
        print(f"{name:<42} {len(report.cases):3d} case-dtype pairs  median {med:5.2f} s  "
              f"({med / TARGET_S:.2f} of the {TARGET_S:g} s target: {'met' if med <= TARGET_S else 'MISSED'})")


if __name__ == "__main__":
    main()
