"""Helpers for the chapter notebooks: show package source, pick sizes per device."""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["show_source", "describe_device"]


def show_source(obj: Any, lines: tuple[int, int] | None = None) -> Any:
    """Display the source of ``obj`` from the installed package, highlighted.

    The book shows code this way so that what the reader sees is exactly
    what runs: nothing is pasted into a notebook twice.

    Args:
        obj: a class, function or method of :mod:`attn`.
        lines: optional ``(first, last)`` line range within the object's source (1-based).
    """
    from IPython.display import Code

    src = inspect.getsource(obj)
    if lines is not None:
        first, last = lines
        src = "\n".join(src.splitlines()[first - 1 : last])
    return Code(src, language="python")


def describe_device() -> str:
    """One line naming the device, torch version and thread count the notebook runs with."""
    import torch

    from .benchmark import default_device

    dev = default_device()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return f"torch {torch.__version__} on {dev.type} ({name})"
