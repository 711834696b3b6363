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


MAX_NAMED = 3  # keys named per kind of mismatch in a checkpoint error (load_strict)


def list_keys(keys: list[str]) -> str:
    """The first MAX_NAMED keys (in order), and how many more: for one-line checkpoint errors."""
    more = len(keys) - MAX_NAMED
    return ", ".join(keys[:MAX_NAMED]) + (f" and {more} more" if more > 0 else "")


def load_strict(module: torch.nn.Module, state_dict: dict, context: str) -> None:
    """load_state_dict(strict=True), but a mismatch is one PersenseError line (`context`: ...) naming the keys:
    missing, unexpected, or of the wrong shape (torch puts them on later lines of a multi-line error)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {list(v.shape)} (expected {list(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k].shape
    ]
    problems = [
        f"{label} {list_keys(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]
    if problems:
        raise PersenseError(f"{context}: {'; '.join(problems)}")
    try:
        module.load_state_dict(state_dict, strict=True)
    except (RuntimeError, TypeError) as exc:  # a value that is not a tensor
        raise PersenseError(f"{context}: {' '.join(str(exc).split())[:300]}") from exc
