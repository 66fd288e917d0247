"""The Dagster side of `bench/compare`: one workload per run, chosen on the command line.

    python workloads.py W1 1000

Each workload is a job executed in process (`execute_in_process`) on a persistent instance
in $DAGSTER_HOME (runs and events recorded in its SQLite storage, as Kiln records its runs).
A chain is a static graph of N aliased ops; W6 fans out N ops with dynamic outputs and
sums them (the in-process executor runs ops one after another). Results: W2 keeps them in
memory (`mem_io_manager`), W3 pickles them to files (`FilesystemIOManager`), W4 writes PNG
files through an IO manager of its own. Prints one JSON line: {"workload", "result", "records"}.
"""

import json
import os
import sys

from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shared"))
from images import digest, start_image, step_body  # noqa: E402
from dagster import (  # noqa: E402
    ConfigurableIOManager,
    DagsterInstance,
    DynamicOut,
    DynamicOutput,
    FilesystemIOManager,
    InputContext,
    OutputContext,
    job,
    mem_io_manager,
    op,
)


class PngIOManager(ConfigurableIOManager):
    """Op outputs that are PIL images as PNG files (fast level), one per op; others as JSON."""

    base_dir: str

    def _path(self, context) -> str:
        return os.path.join(self.base_dir, *context.get_identifier())

    def handle_output(self, context: OutputContext, obj) -> None:
        path = self._path(context)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(obj, Image.Image):
            obj.save(path + ".png", format="PNG", compress_level=1)
        else:
            with open(path + ".json", "w") as f:
                json.dump(obj, f)

    def load_input(self, context: InputContext):
        path = self._path(context.upstream_output)
        if os.path.exists(path + ".png"):
            return Image.open(path + ".png").convert("RGB")
        with open(path + ".json") as f:
            return json.load(f)


@op
def zero() -> int:
    return 0


@op
def inc(x: int) -> int:
    return x + 1


@op
def start() -> Image.Image:
    return start_image()


@op
def step(img: Image.Image) -> Image.Image:
    return step_body(img)


@op
def finish(img: Image.Image) -> str:
    return digest(img)


def w1_job(n: int):
    @job(name="w1")
    def w1():
        v = zero()
        for i in range(n):
            v = inc.alias(f"inc_{i}")(v)

    return w1, f"inc_{n - 1}"


def chain_job(n: int, io_manager):
    @job(name="chain", resource_defs={"io_manager": io_manager})
    def chain():
        img = start()
        for i in range(n):
            img = step.alias(f"step_{i}")(img)
        finish(img)

    return chain, "finish"


def w6_job(n: int):
    @op(out=DynamicOut(int))
    def numbers():
        for i in range(n):
            yield DynamicOutput(i, mapping_key=str(i))

    @op
    def total(values: list) -> int:
        return sum(values)

    @job(name="w6")
    def w6():
        total(numbers().map(inc).collect())

    return w6, "total"


def main() -> None:
    workload, n = sys.argv[1], int(sys.argv[2])
    home = os.environ["DAGSTER_HOME"]
    storage = os.path.join(home, "storage")
    if workload == "W1":
        definition, node = w1_job(n)
    elif workload == "W2":
        definition, node = chain_job(n, mem_io_manager)
    elif workload == "W3":
        definition, node = chain_job(n, FilesystemIOManager(base_dir=storage))
    elif workload == "W4":
        definition, node = chain_job(n, PngIOManager(base_dir=storage))
    elif workload == "W6":
        definition, node = w6_job(n)
    else:
        sys.exit(f"workload {workload} has no Dagster equivalent")
    with DagsterInstance.get() as instance:
        result = definition.execute_in_process(instance=instance)
    if not result.success:
        sys.exit(f"the {workload} job failed")
    value = result.output_for_node(node)
    # Files written for the chain's step outputs (the IO manager also stores start and finish).
    records = len([p for p in _files(storage) if "step_" in p]) if workload in ("W3", "W4") else None
    print(json.dumps({"workload": workload, "result": value, "records": records}))


def _files(root: str):
    for d, _, files in os.walk(root):
        for f in files:
            yield os.path.join(d, f)


if __name__ == "__main__":
    main()
