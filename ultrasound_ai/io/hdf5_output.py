"""Write an HDF5 file so that a full disk is an ordinary Python error, never a crash.

When the disk fills up while the HDF5 library writes a file itself, every later flush fails again and
the process ends in a segmentation fault at exit (seen with h5py 3 on a full tmpfs). Here the file
is built in memory (h5py's file-object driver on a BytesIO) and then written with one ordinary
Python write into an `atomic_output` temporary: ENOSPC becomes OutputWriteError naming the user's
path, and nothing is left under the final name. The price is one in-memory copy of the (compressed)
file, which for sweeps and ULM results is smaller than the arrays the caller already holds.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

from ultrasound_ai.core.atomic import atomic_output


@contextlib.contextmanager
def hdf5_output(path: str | os.PathLike, **file_kwargs) -> Iterator:
    """Yield a writable `h5py.File` (in memory); on success its bytes replace `path` atomically."""
    import h5py

    with atomic_output(Path(path)) as tmp:
        buffer = io.BytesIO()
        with h5py.File(buffer, "w", **file_kwargs) as fh:
            yield fh
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
