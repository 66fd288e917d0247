"""The Prefect 3 side of `bench/compare`: one workload per run, chosen on the command line.

    python workloads.py W1 1000

Prints one JSON line: {"workload", "result", "records"} so the harness can check that
both systems did the same work (same final value or image hash, same number of records).
Run with PREFECT_HOME and PREFECT_LOCAL_STORAGE_PATH pointing at a temporary folder.
"""

import io
import json
import os
import sys

from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shared"))
from images import digest, files_under, start_image, step_body  # noqa: E402
from prefect import flow, task
from prefect.cache_policies import INPUTS
from prefect.serializers import Serializer
from prefect.task_runners import ThreadPoolTaskRunner


class PngSerializer(Serializer):
    """A PNG serializer for PIL images, written as Prefect's docs show custom serializers."""

    type: str = "png"

    def dumps(self, obj) -> bytes:
        out = io.BytesIO()
        obj.save(out, format="PNG", compress_level=1)
        return out.getvalue()

    def loads(self, blob: bytes):
        return Image.open(io.BytesIO(blob)).convert("RGB")


@task
def inc(x: int) -> int:
    return x + 1


@task
def step(img: Image.Image) -> Image.Image:
    return step_body(img)


@task(persist_result=True)
def step_persisted(img: Image.Image) -> Image.Image:
    return step_body(img)


@task(persist_result=True, result_serializer=PngSerializer())
def step_png(img: Image.Image) -> Image.Image:
    return step_body(img)


@task(persist_result=True, cache_policy=INPUTS)
def step_cached(img: Image.Image, i: int) -> Image.Image:
    return step_body(img)


@flow
def w1(n: int) -> int:
    v = 0
    for _ in range(n):
        v = inc(v)
    return v


@flow
def chain(n: int, kind: str) -> str:
    img = start_image()
    for i in range(n):
        if kind == "plain":
            img = step(img)
        elif kind == "persisted":
            img = step_persisted(img)
        elif kind == "png":
            img = step_png(img)
        else:
            img = step_cached(img, i)
    return digest(img)


@flow(task_runner=ThreadPoolTaskRunner())
def w6(n: int) -> int:
    futures = [inc.submit(i) for i in range(n)]
    return sum(f.result() for f in futures)


def records() -> int:
    return files_under(os.environ.get("PREFECT_LOCAL_STORAGE_PATH", ""))


def main() -> None:
    workload, n = sys.argv[1], int(sys.argv[2])
    if workload == "W1":
        result = w1(n)
    elif workload == "W2":
        result = chain(n, "plain")
    elif workload == "W3":
        result = chain(n, "persisted")
    elif workload == "W4":
        result = chain(n, "png")
    elif workload in ("W5-prime", "W5"):
        result = chain(n, "cached")
    elif workload == "W6":
        result = w6(n)
    else:
        sys.exit(f"unknown workload {workload}")
    print(json.dumps({"workload": workload, "result": result, "records": records()}))


if __name__ == "__main__":
    main()
