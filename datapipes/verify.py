"""Read a .beton end to end through a real FFCV Loader, decoding every image, and report damaged samples.

FFCV's own decoders ignore libjpeg-turbo's return code (a corrupt JPEG silently becomes garbage pixels),
so verification uses `DecodeStatus`: a decoder that decodes each image like SimpleRGBImageDecoder but
outputs the decode status per sample (0 ok, -1 JPEG decode failed, -2 raw data of the wrong size).
The structural checks of `beton.read_info` run first: they keep the loader from reading past the file.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.state import State

from oodlab.datapipes.beton import BetonError, BetonInfo, read_info
from oodlab.datapipes.loaders import cpu_budget

DECODE_FAILED, WRONG_SIZE = -1, -2
_LISTED = 10
_BUFFER_BYTES = 256 * 2**20
_BATCHES_BUFFERED = 4  # FFCV allocates batches_ahead (2) + 2 batch slots


class DecodeStatus(SimpleRGBImageDecoder):
    """Decoder op whose output per sample is the int32 decode status instead of the pixels."""

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, AllocationQuery]]:
        biggest = np.uint64(self.metadata["height"].max()) * np.uint64(self.metadata["width"].max()) * np.uint64(3)
        status = np.dtype("<i4")
        return (replace(previous_state, jit_mode=True, shape=(1,), dtype=status),
                (AllocationQuery((1,), status), AllocationQuery((biggest,), np.dtype("<u1"))))

    def generate_code(self) -> Callable:
        mem_read, jpg = self.memory_read, IMAGE_MODES["jpg"]
        imdecode_c, my_range = Compiler.compile(imdecode), Compiler.get_iterator()

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    destination[dst_ix, 0] = imdecode_c(data, temp_storage[dst_ix], height, width, height, width,
                                                        0, 0, 1, 1, False, False)
                elif data.size == np.uint64(height) * np.uint64(width) * np.uint64(3):
                    destination[dst_ix, 0] = 0
                else:
                    destination[dst_ix, 0] = WRONG_SIZE
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


def verify(path: str | Path, batch_size: int = 256, threads: int = 1) -> BetonInfo:
    """Decode every image and label of `path` through an FFCV Loader; BetonError naming damaged samples.

    The batch is shrunk so FFCV's decode buffers (one largest image per sample, 4 batches) stay near 256 MiB.
    """
    info = read_info(path)
    largest = info.max_size[0] * info.max_size[1] * 3
    batch_size = max(1, min(batch_size, _BUFFER_BYTES // (_BATCHES_BUFFERED * largest)))
    loader = Loader(str(path), batch_size=batch_size, num_workers=cpu_budget(threads), order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines={"image": [DecodeStatus()], "label": [IntDecoder()]})
    status = np.concatenate([np.asarray(s).reshape(-1) for s, _ in loader])
    if len(status) != info.count:
        raise BetonError(f"{path}: the loader read {len(status)} samples, the header says {info.count}; rewrite it")
    bad = np.flatnonzero(status != 0)
    if bad.size:
        kinds = {DECODE_FAILED: "JPEG data does not decode", WRONG_SIZE: "raw data has the wrong size"}
        examples = ", ".join(f"{i} ({kinds.get(int(status[i]), f'status {status[i]}')})" for i in bad[:_LISTED])
        raise BetonError(f"{path}: {bad.size} of {info.count} images are corrupt, e.g. samples {examples}; "
                         "rewrite it with `oodlab data write`")
    return info
