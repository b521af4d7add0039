"""One model registry (after timm): models are created by name with the same arguments.

Every registered model is a `models.layers.Classifier` (an `nn.Module`) with
- `forward_features(x)` -> a (N, num_features) tensor and `forward_head(features)` -> logits, so export,
  feature extraction (domain FID) and the clip encoder reuse any model without special cases;
- `num_features` and `input_kind` ("image": (N, C, H, W) or "clip": (N, T, C, H, W)).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from torch import nn

from visionflow.config import TYPE_CHECKS, TYPE_NAMES
from visionflow.errors import VisionflowError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[..., nn.Module]
    input_kind: str
    summary: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, input_kind: str = "image"):
    """Decorator: `@register_model("seed-cnn")` over a function (num_classes, in_channels, image_size, **options)."""
    def wrap(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        summary = (build.__doc__ or "").strip().splitlines()[0] if build.__doc__ else ""
        _REGISTRY[name] = ModelEntry(name, build, input_kind, summary)
        return build
    return wrap


def model_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise VisionflowError(f"unknown model '{name}' (known: {', '.join(list_models())})")
    return _REGISTRY[name]


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, in_channels: int, image_size: int, **options) -> nn.Module:
    """Build a registered model by name; options are the family's own (e.g. hidden size for RNNs)."""
    entry = model_entry(name)
    defaults = {p.name: p.default for p in inspect.signature(entry.build).parameters.values()
                if p.name not in ("num_classes", "in_channels", "image_size")}  # the family's own options
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise VisionflowError(f"model '{name}': unknown option(s) {', '.join(unknown)} "
                              f"(its options: {', '.join(defaults) or 'none'})")
    for key, value in options.items():
        kind = type(defaults[key]).__name__
        if kind in TYPE_CHECKS and not TYPE_CHECKS[kind](value):
            raise VisionflowError(f"model '{name}': option {key} takes {TYPE_NAMES[kind]} (got {value!r})")
    model = entry.build(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **options)
    model.input_kind = entry.input_kind
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
