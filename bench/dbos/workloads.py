"""The DBOS side of `bench/compare`: one workload per run, chosen on the command line.

    python workloads.py W1 1000

DBOS 3 on its SQLite system database ($DBOS_HOME/dbos.sqlite). DBOS checkpoints every
step's output in that database (pickled, base64) by design, so its "nothing persisted"
workloads persist too; W4 sets a serializer that writes images as PNG (DBOS serializers
are set for the whole process). Prints one JSON line: {"workload", "result", "records"}.
"""

import base64
import io
import json
import os
import pickle
import sys

from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shared"))
from images import digest, start_image, step_body  # noqa: E402
from dbos import DBOS, DBOSConfig  # noqa: E402
from dbos._serialization import DefaultSerializer, Serializer  # noqa: E402


class PngSerializer(Serializer):
    """PIL images as PNG (fast level), anything else as DBOS's default (pickle)."""

    def __init__(self):
        self.default = DefaultSerializer()

    def serialize(self, data) -> str:
        if isinstance(data, Image.Image):
            out = io.BytesIO()
            data.save(out, format="PNG", compress_level=1)
            return "png:" + base64.b64encode(out.getvalue()).decode()
        return self.default.serialize(data)

    def deserialize(self, serialized_data: str):
        if serialized_data.startswith("png:"):
            return Image.open(io.BytesIO(base64.b64decode(serialized_data[4:]))).convert("RGB")
        return self.default.deserialize(serialized_data)

    def name(self) -> str:
        return "png_or_pickle"


@DBOS.step()
def inc(x: int) -> int:
    return x + 1


@DBOS.step()
def step(img: Image.Image) -> Image.Image:
    return step_body(img)


@DBOS.workflow()
def w1(n: int) -> int:
    v = 0
    for _ in range(n):
        v = inc(v)
    return v


@DBOS.workflow()
def chain(n: int) -> str:
    img = start_image()
    for _ in range(n):
        img = step(img)
    return digest(img)


@DBOS.workflow()
def inc_workflow(x: int) -> int:
    return inc(x)


@DBOS.workflow()
def w6(n: int) -> int:
    # DBOS runs functions concurrently through a queue; it polls every 10 ms here (its
    # default, one second, would make this workload a measure of the poll).
    queue = DBOS.retrieve_queue("w6")
    handles = [queue.enqueue(inc_workflow, i) for i in range(n)]
    return sum(h.get_result() for h in handles)


def steps_recorded(path: str) -> int:
    import sqlite3

    with sqlite3.connect(path) as db:
        return db.execute("SELECT count(*) FROM operation_outputs WHERE function_name LIKE '%step%'").fetchone()[0]


def main() -> None:
    workload, n = sys.argv[1], int(sys.argv[2])
    home = os.environ["DBOS_HOME"]
    path = os.path.join(home, "dbos.sqlite")
    config: DBOSConfig = {"name": "kiln-compare", "system_database_url": f"sqlite:///{path}"}
    if workload == "W4":
        config["serializer"] = PngSerializer()
    DBOS(config=config)
    DBOS.launch()
    if workload == "W6":
        DBOS.register_queue("w6", polling_interval_sec=0.01)
    if workload == "W1":
        result = w1(n)
    elif workload in ("W2", "W3", "W4"):
        result = chain(n)
    elif workload == "W6":
        result = w6(n)
    else:
        sys.exit(f"workload {workload} has no DBOS equivalent")
    records = steps_recorded(path) if workload in ("W3", "W4") else None
    DBOS.destroy()
    print(json.dumps({"workload": workload, "result": result, "records": records}))


if __name__ == "__main__":
    main()
