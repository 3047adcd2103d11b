"""Run by the launch tests under a real launcher: init_distributed, one all-reduce, report as JSON.

`--stall-rank R` makes rank R skip the all-reduce and sleep (a hung peer); `--die-rank R` makes it
exit at once (a dead peer). `--timeout-s` is passed to init_distributed.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from training.distributed import barrier, destroy, init_distributed  # noqa: E402


def report(tag: str, values: dict) -> None:
    # One write per line: ranks share the launcher's pipe, and print() writes its arguments and
    # the newline separately, so two ranks' lines were seen interleaved ("PROBEPROBE {...}").
    sys.stdout.write(f"{tag} {json.dumps(values)}\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--timeout-s", type=float, default=100.0)
    parser.add_argument("--stall-rank", type=int, default=-1)
    parser.add_argument("--die-rank", type=int, default=-1)
    args = parser.parse_args()
    info = init_distributed(timeout_s=args.timeout_s)
    barrier()
    if info.rank == args.die_rank:
        os._exit(0)
    if info.rank == args.stall_rank:
        time.sleep(args.timeout_s * 3 + 30)
        return 0
    value = torch.tensor([float(info.rank + 1)])
    started = time.monotonic()
    try:
        torch.distributed.all_reduce(value)
    except Exception as err:  # the point of the stall/die modes: report how the collective failed
        report("PROBE_ERROR", {"rank": info.rank, "after_s": time.monotonic() - started,
                               "error": f"{type(err).__name__}: {err}"[:500]})
        os._exit(1)
    report("PROBE", {**info.__dict__, "sum": value.item(), "threads": torch.get_num_threads()})
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
