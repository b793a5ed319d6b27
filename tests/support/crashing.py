"""A stand-in for the codec whose worker dies on one input, for the pool's crash tests
(a module-level function: the pool's workers import it by name)."""

from __future__ import annotations

import os
import time

from imgpipe.contracts.events import Options
from imgpipe.processor.compress import Compressed

CRASH = b"crash"
STUCK = b"stuck"


def compress_or_die(data: bytes, options: Options, max_pixels: int) -> Compressed:
    if data == CRASH:
        os._exit(70)  # as a segfaulting decoder or the OOM killer would end it
    if data == STUCK:
        time.sleep(3600)  # as a decoder that never ends
    time.sleep(0.05)  # innocent images stay in the pool while the crash happens
    return Compressed(data, "jpeg", 1, 1)
