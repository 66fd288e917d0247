"""The Python peers of the benchmarks, each installed once into a virtual environment of its
own under bench/ (with uv), and the environments bench/compare and bench/dispatch share."""

import os
import subprocess
import sys

# Prefect 3 for bench/compare's workloads and bench/dispatch's background task workers.
PREFECT = ("bench/.venv", ["prefect==3.9.1", "pillow"])


def ensure(root, venv, packages):
    """The Python of virtual environment `venv` (relative to `root`) holding `packages`: made
    and installed when it is missing or an earlier install did not finish (a marker file
    names the packages of the last install that did)."""
    path = os.path.join(root, venv)
    python = os.path.join(path, "bin", "python")
    marker = os.path.join(path, ".kiln-installed")
    wanted = "\n".join(packages)
    if os.path.exists(python) and os.path.exists(marker):
        with open(marker) as f:
            if f.read() == wanted:
                return python
    print(f"installing {' '.join(packages)} into {venv} (once)", file=sys.stderr)
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", path], check=True)
    subprocess.run([os.path.join(path, "bin", "pip"), "install", "-q", "uv"], check=True)
    subprocess.run([os.path.join(path, "bin", "uv"), "pip", "install", "-q", *packages], check=True,
                   env=dict(os.environ, VIRTUAL_ENV=path))
    with open(marker, "w") as f:
        f.write(wanted)
    return python
