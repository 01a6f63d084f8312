"""Every default and shared vocabulary (the values an option may take) of wcond, defined once.

Library signatures and CLI options refer to these names. The module imports nothing heavy, so
the command line can build its options (and answer ``--help``) without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

__all__ = [
    "AXES",
    "DIFF_FORMATS",
    "INSPECT_FORMATS",
    "Axis",
    "Device",
    "DiffFormat",
    "InspectFormat",
    "Optimizer",
    "RewriteFormat",
    "AXIS",
    "DEVICE",
    "DEVICES",
    "ITERATIONS",
    "LR",
    "MAX_DPI",
    "MAX_ITERATIONS",
    "MAX_PIXELS",
    "MAX_SEED",
    "MAX_SIDE",
    "MAX_TOP",
    "MAX_VECTORS",
    "MAX_VECTORS_LIMIT",
    "OPTIMIZER",
    "OPTIMIZERS",
    "TAU_COS",
    "TAU_EUC",
    "TOP",
    "TREND_FORMAT_NAMES",
    "ProgressFn",
]

# Near-parallel test (METRICS.md): 1 - |cos| below TAU_COS and rescaled distance below TAU_EUC.
TAU_COS = 1e-4
TAU_EUC = 0.1
TOP = 3  # closest pairs listed per layer and axis

# "auto" picks CUDA, then MPS, then the CPU (wcond.engine.device.resolve_device).
Device = Literal["auto", "cpu", "cuda", "mps"]
DEVICES: tuple[str, ...] = get_args(Device)
DEVICE: Device = "auto"

# shrink: which axes of a layer are fused; "auto" is the longer one (both for a square layer).
Axis = Literal["auto", "rows", "cols", "both"]
AXES: tuple[str, ...] = get_args(Axis)
AXIS: Axis = "auto"

# init-cs: the CS paper's Algorithm 1 setting (Adam at 1e-3 for 500 steps).
ITERATIONS = 500
LR = 1e-3
Optimizer = Literal["adam", "sgd"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
OPTIMIZER: Optimizer = "adam"

# plot: beyond this a heatmap cell is under a pixel at default sizes, so vectors are subsampled.
MAX_VECTORS = 256

# Bounds on option values: beyond them a value is a typo, and would run for hours or exhaust memory.
MAX_TOP = 1_000  # closest pairs listed per layer and axis
MAX_ITERATIONS = 10_000_000  # init-cs steps
MAX_SEED = 2**64 - 1  # torch seeds are 64-bit
MAX_VECTORS_LIMIT = 4_096  # plot: the cosine matrix is max_vectors² float64s (128 MiB)
MAX_SIDE = 16_384  # plot: pixels, width or height (Agg allocates the whole canvas)
MAX_PIXELS = 40_000_000  # plot: width x height, e.g. 8000 x 5000
MAX_DPI = 1_200

# Called as progress(done, total, key) while a long operation runs.
ProgressFn = Callable[[int, int, str], None]

# Output formats, by command: the first is the default.
InspectFormat = Literal["table", "json", "markdown", "csv", "html", "junit", "parquet"]
INSPECT_FORMATS: tuple[str, ...] = get_args(InspectFormat)
DiffFormat = Literal["table", "json", "markdown"]
DIFF_FORMATS: tuple[str, ...] = get_args(DiffFormat)
# inspect of several checkpoints shows their trend, in these (and parquet)
TREND_FORMAT_NAMES = ("table", "json", "csv", "markdown", "html", "junit")
RewriteFormat = Literal["table", "json"]  # init-cs and shrink: a table, or JSON for scripts
