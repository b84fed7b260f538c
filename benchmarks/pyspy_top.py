"""Summarise py-spy's collapsed stacks (`record --format raw --threads`): per thread, its samples
and the functions that take them (self and inclusive).

    python3 benchmarks/pyspy_top.py pyspy_1_gateway_1234.txt [--top 15]
"""

from __future__ import annotations

import argparse
import collections
import re

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def _name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{m['func']} ({m['file'].rsplit('/', 2)[-1] if '/' in m['file'] else m['file']})"


def summarise(path: str, top: int) -> str:
    threads: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    inclusive: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for line in open(path):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread", "process")) else "-"
        body = [_name(f) for f in frames[1:]] if thread != "-" else [_name(f) for f in frames]
        n = int(count)
        totals[thread] += n
        if body:
            threads[thread][body[-1]] += n
        for name in set(body):
            inclusive[thread][name] += n
    lines = []
    for thread, total in totals.most_common():
        lines.append(f"{thread}: {total} samples")
        lines.append("  self:")
        lines += [f"    {n:7d} {100 * n / total:5.1f}%  {name}" for name, n in threads[thread].most_common(top)]
        lines.append("  inclusive:")
        lines += [f"    {n:7d} {100 * n / total:5.1f}%  {name}" for name, n in inclusive[thread].most_common(top)]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    for path in args.paths:
        print(f"== {path}")
        print(summarise(path, args.top))


if __name__ == "__main__":
    main()
