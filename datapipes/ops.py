"""FFCV pipeline operations oodlab adds: normalisation straight into contiguous NCHW float32."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State


class NormalizeCHW(Operation):
    """uint8 (B, H, W, 3) -> normalised float32 (B, 3, H, W), contiguous, in one parallel numba pass.

    The same lookup table as FFCV's NormalizeImage (so the values are identical), but written in
    channel-first order: NormalizeImage + ToTorchImage(channels_last=False) costs two extra copies
    of the float batch on the main thread (about a third of the throughput at 224 px on 2 cores).
    """

    def __init__(self, table: np.ndarray):
        super().__init__()
        self.table = np.ascontiguousarray(table, dtype=np.float32)  # (256, 3): uint8 value -> normalised

    def generate_code(self) -> Callable:
        table, my_range = self.table, Compiler.get_iterator()

        def normalize_chw(images, result, indices):
            height, width = images.shape[1], images.shape[2]
            for i in my_range(len(indices)):
                for c in range(3):
                    for y in range(height):
                        for x in range(width):
                            result[i, c, y, x] = table[images[i, y, x, c], c]
            return result[: len(indices)]

        normalize_chw.is_parallel = True
        normalize_chw.with_indices = True
        return normalize_chw

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        height, width, channels = previous_state.shape
        shape, dtype = (channels, height, width), np.dtype(np.float32)
        return replace(previous_state, jit_mode=True, shape=shape, dtype=dtype), AllocationQuery(shape, dtype)
