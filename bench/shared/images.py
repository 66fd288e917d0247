"""What the image workloads of bench/compare share across the Python peers.

The same bytes as `start_image` and `step_body` in crates/kiln/examples/compare_workloads.rs:
a 512x512 RGB gradient with noise from a fixed LCG (it compresses like a photo), and a step
that adds one to every byte of every pixel.
"""

import os

from PIL import Image

SIZE = 512


def start_image() -> Image.Image:
    seed = 1
    out = bytearray(SIZE * SIZE * 3)
    i = 0
    for y in range(SIZE):
        for x in range(SIZE):
            for c in range(3):
                seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
                out[i] = ((x + y + 64 * c) // 4 + (seed >> 16) % 32) & 255
                i += 1
    return Image.frombytes("RGB", (SIZE, SIZE), bytes(out))


_PLUS_ONE = [(v + 1) % 256 for v in range(256)] * 3


def step_body(img: Image.Image) -> Image.Image:
    """Every byte of every pixel plus one (a lookup table over the three bands)."""
    return img.point(_PLUS_ONE)


def digest(img: Image.Image) -> str:
    """Writes the raw pixels to $BENCH_OUT/final.raw for the harness to compare."""
    out = os.environ.get("BENCH_OUT")
    if out:
        with open(os.path.join(out, "final.raw"), "wb") as f:
            f.write(img.tobytes())
    return "image"


def files_under(root: str) -> int:
    return sum(len(files) for _, _, files in os.walk(root)) if root and os.path.isdir(root) else 0
