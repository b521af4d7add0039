"""visionflow: deep learning on images - train, evaluate and label from one CLI and one Python API."""

__version__ = "0.1.0"
