"""The one codec of a reference's vectors (`Target`: embedding and feature, float32 [256]) on disk.

Both files that hold them are .npz archives of named arrays written by `encode` and read by `decode`:
a reference cache entry (runtime/reference_cache.py: fields format, key, checksum) and a reference the
user saves (`Reference.save` in runtime/api.py: field meta, a JSON string). Here too: the check that
read vectors are float32 [256] and finite, and the sha256 over their bytes that both files record.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from persense.runtime.models.sam import EMBED_DIM
from persense.runtime.pipeline.prior import Target

VECTORS = ("embedding", "feature")
# what decode raises for bytes that are not a readable archive of the named arrays (no pickles are loaded)
DECODE_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def encode(target: Target, **fields: Any) -> bytes:
    """The .npz bytes of the vectors as they are, then each field as np.array(value) (0-d: ints, strings)."""
    buffer = io.BytesIO()
    np.savez(buffer, embedding=target.embedding, feature=target.feature, **{k: np.array(v) for k, v in fields.items()})
    return buffer.getvalue()


def decode(data: bytes, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays `names` of .npz bytes, read in that order; one of DECODE_ERRORS if they cannot be."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in names}


def checked_vector(array: np.ndarray, name: str, error: type[Exception]) -> np.ndarray:
    """`array` as float32 [256] if it is exactly that shape, a float dtype and finite; else `error`."""
    array = np.asarray(array)
    if array.shape != (EMBED_DIM,) or array.dtype.kind != "f":
        raise error(f"{name} is {array.dtype}{list(array.shape)}, not float32[{EMBED_DIM}]")
    if not np.isfinite(array).all():
        raise error(f"{name} has non-finite values")
    return np.ascontiguousarray(array, dtype=np.float32)


def checked_target(arrays: dict[str, np.ndarray], error: type[Exception]) -> Target:
    """The Target of decoded arrays, each vector through checked_vector (embedding first)."""
    return Target(*(checked_vector(arrays[name], name, error) for name in VECTORS))


def checksum(target: Target, context: bytes = b"") -> str:
    """Hex sha256 of `context` then the embedding's and the feature's bytes."""
    digest = hashlib.sha256(context)
    digest.update(target.embedding.tobytes())
    digest.update(target.feature.tobytes())
    return digest.hexdigest()
