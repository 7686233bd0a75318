"""Multimodal attention sandbox: see and measure what attention heads do when text, images and audio meet.

The names below are imported when first used (`from multimodal import CrossAttentionFusion`), so
`import multimodal` (and `multimodal --help`) does not pay for torch until something needs it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_HOMES = {
    "CrossAttentionFusion": "multimodal.fusion", "FusionConfig": "multimodal.fusion",
    "FusionOutput": "multimodal.fusion", "MapRequest": "multimodal.fusion",
    "AttentionMaps": "multimodal.types", "AudioGeometry": "multimodal.types", "ImageGeometry": "multimodal.types",
    "ModalityTokens": "multimodal.types", "TextGeometry": "multimodal.types", "InputError": "multimodal.errors",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'multimodal' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
