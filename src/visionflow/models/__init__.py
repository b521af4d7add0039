"""Models: one registry, one file per family. Importing this package registers every family."""

from visionflow.models import airbench, cnn, resnet, rnn  # noqa: F401  (registers the families)
from visionflow.models.registry import count_parameters, create_model, list_models, model_entry, register_model

__all__ = ["count_parameters", "create_model", "list_models", "model_entry", "register_model"]
