"""``python -m mooncake_real.rank_main SPEC.json``: the body of one rank process started by the launcher."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mooncake_real.rank_main SPEC.json", file=sys.stderr)
        return 2
    from .fdtable import grow_fd_table

    grow_fd_table()  # before any thread: a descriptor opened later never waits for the table to grow
    from .heap import keep_freed_memory

    keep_freed_memory()  # a large tensor's chunks reuse warm heap instead of faulting in fresh pages
    from .driver import RankSpec, run_rank

    spec = RankSpec.from_json(Path(args[0]).read_text())
    return run_rank(spec)


if __name__ == "__main__":
    try:
        code = main()
    except BaseException:
        traceback.print_exc()
        code = 3
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: daemon activity threads may sit in C calls (zmq, CUDA); interpreter teardown must not wait
    os._exit(code)
