"""Recurrent models: shapes, the seed's network, Keras-like initialisation, and that order matters."""

from __future__ import annotations

import pytest
import torch

from visionflow.errors import VisionflowError
from visionflow.models import create_model, model_entry
from visionflow.models.rnn import rows_as_sequence


@pytest.mark.parametrize("name, options, features", [
    ("seed-rnn", {}, 32),
    ("lstm", {}, 128),
    ("gru", {"hidden": 24, "layers": 2, "bidirectional": True}, 48),
    ("lstm", {"hidden": 16, "bidirectional": True}, 32),
])
def test_row_models_give_features_and_logits(name, options, features):
    model = create_model(name, num_classes=7, in_channels=3, image_size=12, **options)
    x = torch.randn(5, 3, 12, 12)
    assert model_entry(name).input_kind == "image"
    assert model.forward_features(x).shape == (5, features) and model.num_features == features
    assert torch.allclose(model(x), model.forward_head(model.forward_features(x)))
    assert model(x).shape == (5, 7)


def test_rows_are_timesteps_and_width_times_channels_the_input():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)  # N, C, H, W
    seq = rows_as_sequence(x)
    assert seq.shape == (2, 4, 15)
    # timestep h of sample n is row h, pixels in order with the channels innermost (Keras's H, W, C layout)
    assert seq[1, 2].tolist() == x[1, :, 2, :].T.reshape(-1).tolist()


def test_seed_rnn_is_the_seeds_network_with_keras_initialisation():
    model = create_model("seed-rnn", num_classes=10, in_channels=1, image_size=28)
    rnn = model.rnn
    assert (rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.nonlinearity) == (28, 32, 1, "relu")
    assert model.head.in_features == 32 and model.head.out_features == 10
    recurrent = rnn.weight_hh_l0.detach()
    assert torch.allclose(recurrent @ recurrent.T, torch.eye(32), atol=1e-5)  # orthogonal
    assert rnn.bias_ih_l0.abs().sum() == 0 and rnn.bias_hh_l0.abs().sum() == 0


def test_lstm_starts_with_a_forget_bias_of_one():
    model = create_model("lstm", num_classes=3, in_channels=1, image_size=8, hidden=6)
    gate_bias = model.rnn.bias_ih_l0.detach() + model.rnn.bias_hh_l0.detach()  # torch's gate order: i, f, g, o
    assert gate_bias[6:12].tolist() == [1.0] * 6
    assert gate_bias[:6].abs().sum() == 0 and gate_bias[12:].abs().sum() == 0


def test_row_order_changes_the_recurrent_models_answer():
    torch.manual_seed(0)
    model = create_model("gru", num_classes=4, in_channels=1, image_size=10, hidden=16).eval()
    x = torch.randn(3, 1, 10, 10)
    assert not torch.allclose(model(x), model(x.flip(2)), atol=1e-4)


def test_mean_pool_control_ignores_frame_order_and_the_recurrent_model_does_not():
    torch.manual_seed(0)
    clips = torch.randn(4, 6, 1, 16, 16)
    shuffled = clips[:, torch.tensor([3, 0, 5, 1, 4, 2])]
    control = create_model("cnn-rnn", num_classes=8, in_channels=1, image_size=16, temporal_pool="mean").eval()
    recurrent = create_model("cnn-rnn", num_classes=8, in_channels=1, image_size=16, cell="gru", hidden=32).eval()
    assert model_entry("cnn-rnn").input_kind == "clip"
    assert control(clips).shape == recurrent(clips).shape == (4, 8)
    assert torch.allclose(control(clips), control(shuffled), atol=1e-5)
    assert not torch.allclose(recurrent(clips), recurrent(shuffled), atol=1e-4)
    assert not hasattr(control, "rnn")  # the control has no recurrence at all


def test_cnn_rnn_encodes_every_frame_with_the_same_weights():
    torch.manual_seed(0)
    model = create_model("cnn-rnn", num_classes=3, in_channels=3, image_size=16, hidden=8).eval()
    frame = torch.randn(1, 3, 16, 16)
    clip = frame[:, None].expand(1, 5, 3, 16, 16)
    per_frame = model.encoder.forward_features(clip.flatten(0, 1))
    assert torch.allclose(per_frame, per_frame[:1].expand_as(per_frame))
    assert model.forward_features(clip).shape == (1, 8)


@pytest.mark.parametrize("name, options, message", [
    ("cnn-rnn", {"cell": "transformer"}, "cell must be one of lstm, gru"),
    ("cnn-rnn", {"temporal_pool": "max"}, "temporal_pool must be one of rnn, mean"),
    ("cnn-rnn", {"encoder": "cnn-rnn"}, "not an image model"),
    ("gru", {"hidden": 0}, "hidden and layers must be at least 1"),
    ("lstm", {"depth": 3}, r"unknown option\(s\) depth \(its options: hidden, layers, bidirectional\)"),
    ("gru", {"hidden": "abc"}, "option hidden takes a whole number"),
    ("gru", {"bidirectional": 2}, "option bidirectional takes true or false"),
])
def test_bad_model_options_are_one_line_errors(name, options, message):
    with pytest.raises(VisionflowError, match=message):
        create_model(name, num_classes=2, in_channels=1, image_size=16, **options)
