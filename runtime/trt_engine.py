"""TensorRT availability check (the TensorRT engine itself lives here too, imported lazily)."""

from __future__ import annotations


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT and a CUDA GPU are usable here, else one line saying why not."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or the PyPI stub failing at import
        return f"tensorrt is not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    try:
        from cuda.bindings import runtime as cudart
    except Exception:
        try:
            from cuda import cudart  # type: ignore[no-redef]
        except Exception as exc:
            return f"cuda-python is not importable ({type(exc).__name__})"
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        return "no CUDA GPU is visible"
    return None
