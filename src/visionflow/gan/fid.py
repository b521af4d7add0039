"""Domain FID: the Fréchet distance between two image sets in a visionflow classifier's feature space.

FID proper uses ImageNet Inception features; those weights cannot be downloaded here, and Inception
knows little about 28x28 digits anyway. So the features are `forward_features` of a classifier trained
on the same data, and the number is only comparable with others computed on the same classifier: hence
the references (held-out real images, an untrained generator) that `gan evaluate` reports beside it.
"""

from __future__ import annotations

import numpy as np
import torch

from visionflow.devices import memory_format
from visionflow.infer.predictor import Predictor


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features (N, D), in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(A) + tr(B) - 2 tr((A B)^1/2), between Gaussians N(mu_a, A) and N(mu_b, B).

    tr((A B)^1/2) = tr((A^1/2 B A^1/2)^1/2), and A^1/2 B A^1/2 is symmetric positive semi-definite, so
    both roots come from symmetric eigendecompositions: no complex parts to discard, as scipy's sqrtm
    on the non-symmetric A B leaves.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(cov_a)
    root_a = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
    middle = root_a @ cov_b @ root_a
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum()
    difference = mean_a - mean_b
    return float(difference @ difference + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)


def feature_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(*gaussian_statistics(features_a), *gaussian_statistics(features_b))


@torch.inference_mode()
def classifier_features(predictor: Predictor, images: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images -> (forward_features (N, D), predicted class (N,)) with the run's own preprocessing."""
    features, predicted = [], []
    for start in range(0, len(images), batch_size):
        x = predictor.preprocess(images[start:start + batch_size].to(predictor.device))
        x = x.contiguous(memory_format=memory_format(predictor.device))
        batch_features = predictor.model.forward_features(x)
        features.append(batch_features.float().cpu())
        predicted.append(predictor.model.forward_head(batch_features).argmax(1).cpu())
    return torch.cat(features).numpy(), torch.cat(predicted).numpy()
