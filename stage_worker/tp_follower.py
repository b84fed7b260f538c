"""python -m stage_worker.tp_follower --model DIR --rank R --world K --port P: rank R of a TP stage.

Started by a `python -m stage_worker --tp-size K` worker (rank 0), never by hand: it joins rank
0's process group on 127.0.0.1:P and mirrors rank 0's executor (see tp_group.py).
"""

from __future__ import annotations

import argparse

import torch

from stage_worker.device import gpu_name
from stage_worker.kernels import tuning
from stage_worker.tp_group import TPGroup, exit_with_parent, follow


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m stage_worker.tp_follower")
    p.add_argument("--model", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--kernel-tuning", default="", help="rank 0's --kernel-tuning (its kernels' tiles, the same here)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    tuning.use(tuning.load(a.kernel_tuning, gpu_name(a.device)))
    exit_with_parent()
    group = TPGroup(a.rank, a.world, a.port, a.device)
    try:
        follow(group, a.model, a.block_size)
    except RuntimeError:  # rank 0 went away mid-collective
        raise SystemExit(1)


if __name__ == "__main__":
    main()
