"""Prefect 3's background tasks beside Kiln's work pools, for bench/dispatch: no-op task runs
queued with `.delay()` and run by task worker processes (`prefect.task_worker.serve`),
through a Prefect server on the same PostgreSQL.

    python dispatch.py worker LIMIT     # prints "start <ms>" per task run: delay-to-start
    python dispatch.py submit N         # N `.delay()` calls at once, then waits for all
    python dispatch.py lone N           # one at a time, each waited for

PREFECT_API_URL names the server. Times come from the monotonic clock (the same in every
process of the machine), in milliseconds.
"""

import json
import sys
import time

from prefect import task
from prefect.futures import wait
from prefect.task_worker import serve


def now_ms():
    return time.clock_gettime(time.CLOCK_MONOTONIC) * 1000.0


@task
def noop(i: int, added: float) -> int:
    # One write per line: task runs print from several threads at once.
    sys.stdout.write(f"start {now_ms() - added}\n")
    sys.stdout.flush()
    return i


def main():
    mode, arg = sys.argv[1], int(sys.argv[2])
    if mode == "worker":
        serve(noop, limit=arg)
        return
    started = now_ms()
    if mode == "submit":
        futures = [noop.delay(i, now_ms()) for i in range(arg)]
        wait(futures)
        total = sum(f.result() for f in futures)
    else:
        total = sum(noop.delay(i, now_ms()).result() for i in range(arg))
    assert total == arg * (arg - 1) // 2, total
    seconds = (now_ms() - started) / 1000.0
    print(json.dumps({"mode": mode, "n": arg, "seconds": seconds, "runs_per_second": arg / seconds}))


if __name__ == "__main__":
    main()
