"""Recurrent networks: over the rows of an image (seed-rnn, lstm, gru) and over the frames of a clip (cnn-rnn).

An image (N, C, H, W) is read as a sequence of H rows, each row a vector of W x C values (the seed's
`SimpleRNN(32, input_shape=(timesteps, input_dim))`). A clip (N, T, C, H, W) is read as T frames, each
encoded by an image model from the same registry with weights shared over time.
"""

from __future__ import annotations

import torch
from torch import nn

from visionflow.errors import VisionflowError
from visionflow.models.cnn import glorot_init
from visionflow.models.layers import Classifier
from visionflow.models.registry import create_model, model_entry, register_model

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}
TEMPORAL_POOLS = ("rnn", "mean")


def rows_as_sequence(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W*C): Keras's (timesteps, input_dim) with channels innermost, as in (H, W, C) data."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, h, w * c)


def keras_recurrent_init(rnn: nn.RNNBase) -> None:
    """Keras's recurrent defaults: Glorot-uniform input kernels, orthogonal recurrent kernels, zero biases,
    and an LSTM forget-gate bias of 1 (unit_forget_bias) so early gradients flow through long sequences."""
    gates = {nn.LSTM: 4, nn.GRU: 3}.get(type(rnn), 1)
    for name, param in rnn.named_parameters():
        chunks = param.data.chunk(gates, 0)  # torch stacks the gates' kernels; Keras initialises each gate alone
        for gate, chunk in enumerate(chunks):
            if name.startswith("weight_ih"):
                nn.init.xavier_uniform_(chunk)
            elif name.startswith("weight_hh"):
                nn.init.orthogonal_(chunk)
            else:
                nn.init.zeros_(chunk)
                # b_ih + b_hh is the gate's bias: put the forget bias (gate 1 in torch's i,f,g,o) in one of them
                if isinstance(rnn, nn.LSTM) and name.startswith("bias_ih") and gate == 1:
                    nn.init.ones_(chunk)


def last_state(rnn: nn.RNNBase, sequence: torch.Tensor) -> torch.Tensor:
    """The top layer's final hidden state, both directions concatenated when bidirectional: (N, features)."""
    _, hidden = rnn(sequence)
    if isinstance(hidden, tuple):  # LSTM: (h_n, c_n)
        hidden = hidden[0]
    directions = 2 if rnn.bidirectional else 1
    return torch.cat(list(hidden[-directions:]), dim=1)


class RowRNN(Classifier):
    """A recurrent network over the rows of an image, then a linear classifier on its last state."""

    def __init__(self, rnn: nn.RNNBase, num_classes: int):
        super().__init__()
        self.rnn = rnn
        self.num_features = rnn.hidden_size * (2 if rnn.bidirectional else 1)
        self.head = nn.Linear(self.num_features, num_classes)
        keras_recurrent_init(self.rnn)
        glorot_init(self.head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return last_state(self.rnn, rows_as_sequence(x))


class SeedRNN(RowRNN):
    """SimpleRNN(32, relu) over the rows, then Dense(classes): the seed's network."""

    # Fed x / 255 like the seed's Keras stack, not standardised: with a ReLU recurrence, a background of
    # 0 (instead of -0.42 on MNIST) keeps empty pixels out of the state. MNIST split, 5 epochs, batch 32,
    # constant lr: 86.5% with x / 255 vs 81.7% standardised.
    standardize_inputs = False

    def __init__(self, num_classes: int, in_channels: int, image_size: int, hidden: int = 32):
        super().__init__(nn.RNN(image_size * in_channels, hidden, nonlinearity="relu", batch_first=True), num_classes)


def gated_rnn(cell: str, input_size: int, hidden: int, layers: int, bidirectional: bool, model: str) -> nn.RNNBase:
    if hidden < 1 or layers < 1:
        raise VisionflowError(f"model '{model}': hidden and layers must be at least 1 (got hidden={hidden}, layers={layers})")
    return CELLS[cell](input_size, hidden, num_layers=layers, batch_first=True, bidirectional=bool(bidirectional))


class CNNRNN(Classifier):
    """A registered image model encodes every frame (shared weights); an LSTM/GRU reads the frame features.

    temporal_pool="mean" replaces the recurrence by the average of the frame features: the same encoder and
    the same linear head, but blind to frame order. It is the control that shows what order adds.
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int, encoder: str = "seed-cnn",
                 cell: str = "lstm", hidden: int = 128, layers: int = 1, bidirectional: bool = False,
                 temporal_pool: str = "rnn"):
        super().__init__()
        if model_entry(encoder).input_kind != "image":
            raise VisionflowError(f"model 'cnn-rnn': encoder '{encoder}' is not an image model")
        if cell not in CELLS:
            raise VisionflowError(f"model 'cnn-rnn': cell must be one of {', '.join(CELLS)} (got {cell})")
        if temporal_pool not in TEMPORAL_POOLS:
            raise VisionflowError(f"model 'cnn-rnn': temporal_pool must be one of {', '.join(TEMPORAL_POOLS)} (got {temporal_pool})")
        # The encoder's own head (for 1 class) is never called: only its features are used.
        self.encoder = create_model(encoder, num_classes=1, in_channels=in_channels, image_size=image_size)
        self.temporal_pool = temporal_pool
        if temporal_pool == "rnn":
            self.rnn = gated_rnn(cell, self.encoder.num_features, hidden, layers, bidirectional, "cnn-rnn")
            keras_recurrent_init(self.rnn)
            self.num_features = hidden * (2 if bidirectional else 1)
        else:
            self.num_features = self.encoder.num_features
        self.head = nn.Linear(self.num_features, num_classes)
        glorot_init(self.head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        n, t = x.shape[:2]
        frames = self.encoder.forward_features(x.flatten(0, 1)).view(n, t, -1)  # all frames in one batch
        if self.temporal_pool == "mean":
            return frames.mean(1)
        return last_state(self.rnn, frames)


@register_model("seed-rnn")
def seed_rnn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The seed's RNN: SimpleRNN(32, relu) over image rows, then a dense classifier (Keras-like init)."""
    return SeedRNN(num_classes, in_channels, image_size)


@register_model("lstm")
def lstm(num_classes: int, in_channels: int, image_size: int, hidden: int = 128, layers: int = 1,
         bidirectional: bool = False) -> nn.Module:
    """LSTM over image rows (options: hidden, layers, bidirectional)."""
    return RowRNN(gated_rnn("lstm", image_size * in_channels, hidden, layers, bidirectional, "lstm"), num_classes)


@register_model("gru")
def gru(num_classes: int, in_channels: int, image_size: int, hidden: int = 128, layers: int = 1,
        bidirectional: bool = False) -> nn.Module:
    """GRU over image rows (options: hidden, layers, bidirectional)."""
    return RowRNN(gated_rnn("gru", image_size * in_channels, hidden, layers, bidirectional, "gru"), num_classes)


@register_model("cnn-rnn", input_kind="clip")
def cnn_rnn(num_classes: int, in_channels: int, image_size: int, encoder: str = "seed-cnn", cell: str = "lstm",
            hidden: int = 128, layers: int = 1, bidirectional: bool = False, temporal_pool: str = "rnn") -> nn.Module:
    """Per-frame CNN (shared weights) + LSTM/GRU over frames (options: cell, hidden, temporal_pool=mean)."""
    return CNNRNN(num_classes, in_channels, image_size, encoder, cell, hidden, layers, bidirectional, temporal_pool)
