"""Reading PyTorch checkpoints safely (no pickled code unless trusted), with one-line errors."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import torch

from persense.runtime.errors import PersenseError

TRUST_ENV = "PERSENSE_TRUST_CHECKPOINTS"


def read_checkpoint(path: str | Path) -> dict:
    """torch.load a checkpoint on the CPU without running pickled code, with clear errors.

    Tensors, plain containers and argparse.Namespace (training scripts store their args) load;
    anything else is refused unless the environment sets PERSENSE_TRUST_CHECKPOINTS=1.
    """
    path = Path(path)
    if not path.is_file():
        raise PersenseError(f"{path}: checkpoint not found (download it and pass its path)")
    trusted = os.environ.get(TRUST_ENV) == "1"
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as exc:
        raise PersenseError(
            f"{path}: the checkpoint pickles objects other than tensors; if you trust the file, "
            f"set {TRUST_ENV}=1 ({str(exc).splitlines()[0][:160]})"
        ) from exc
    except Exception as exc:  # truncated zip, not a torch file at all
        raise PersenseError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from exc
