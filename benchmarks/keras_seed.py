"""The seed's own stack for the benchmark: its models in Keras on TensorFlow, timed like visionflow is.

Runs inside benchmarks/.keras-venv (tensorflow-cpu), never imports visionflow. Reads the arrays the
harness wrote (uint8 images, labels, the normalisation visionflow measured) and prints one JSON object:
per-epoch training seconds, test accuracy after each epoch, and prediction images/s.

    python keras_seed.py --data arrays.npz --model seed-cnn --epochs 5 --batch-size 32 --lr 1e-3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up banner would bury the JSON

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow import keras  # noqa: E402


def seed_cnn(shape: tuple[int, int, int], classes: int) -> keras.Model:
    return keras.Sequential([
        keras.Input(shape),
        keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(64, 3, activation="relu"), keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(classes),
    ])


def seed_rnn(shape: tuple[int, int, int], classes: int) -> keras.Model:
    height, width, channels = shape
    return keras.Sequential([
        keras.Input(shape),
        keras.layers.Reshape((height, width * channels)),  # rows are the time steps
        keras.layers.SimpleRNN(32, activation="relu"),
        keras.layers.Dense(classes),
    ])


MODELS = {"seed-cnn": seed_cnn, "seed-rnn": seed_rnn}


class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """visionflow's `--schedule onecycle` (train/classifier.py build_schedule), step for step: a linear warm-up from
    1/25 of the peak over 30% of the steps, then a cosine down to zero."""

    def __init__(self, peak: float, total_steps: int):
        self.peak, self.total = peak, max(1, total_steps)
        self.warmup = max(1, int(0.3 * self.total))

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        rising = 0.04 + 0.96 * step / self.warmup
        falling = 0.5 * (1.0 + tf.cos(3.141592653589793 * tf.minimum(step - self.warmup, self.total - self.warmup)
                                      / max(1, self.total - self.warmup)))
        return self.peak * tf.where(step < self.warmup, rising, falling)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total}


class EpochTimer(keras.callbacks.Callback):
    """Training seconds per epoch and test accuracy after it (evaluation left out of the timing)."""

    def __init__(self, x_test, y_test):
        super().__init__()
        self.x_test, self.y_test = x_test, y_test
        self.seconds: list[float] = []
        self.accuracy: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)
        logits = self.model.predict(self.x_test, batch_size=256, verbose=0)
        self.accuracy.append(float((logits.argmax(1) == self.y_test).mean()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--schedule", choices=("constant", "onecycle"), default="constant")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--predict-batch-size", type=int, default=256)
    parser.add_argument("--predict-passes", type=int, default=7, help="prediction is the median pass")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    arrays = np.load(args.data)
    mean, std = arrays["mean"], arrays["std"]

    def normalise(images: np.ndarray) -> np.ndarray:  # (N, C, H, W) uint8 -> (N, H, W, C) float, as visionflow
        scaled = images.astype(np.float32) / 255.0
        if args.model != "seed-rnn":  # the seed's RNN reads x / 255, as visionflow's seed-rnn does
            scaled = (scaled - mean[:, None, None]) / std[:, None, None]
        return scaled.transpose(0, 2, 3, 1)

    x_train, y_train = normalise(arrays["train_images"]), arrays["train_labels"]
    x_test, y_test = normalise(arrays["test_images"]), arrays["test_labels"]
    classes = int(max(y_train.max(), y_test.max())) + 1
    keras.utils.set_random_seed(args.seed)
    model = MODELS[args.model](x_train.shape[1:], classes)
    steps = args.epochs * -(-len(x_train) // args.batch_size)
    lr = OneCycle(args.lr, steps) if args.schedule == "onecycle" else args.lr
    if args.label_smoothing:  # Keras smooths only one-hot targets
        loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=args.label_smoothing)
        targets = keras.utils.to_categorical(y_train, classes)
    else:
        loss, targets = keras.losses.SparseCategoricalCrossentropy(from_logits=True), y_train
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss)
    timer = EpochTimer(x_test, y_test)
    model.fit(x_train, targets, batch_size=args.batch_size, epochs=args.epochs, shuffle=True, verbose=0,
              callbacks=[timer])

    model.predict(x_test[:args.predict_batch_size], batch_size=args.predict_batch_size, verbose=0)  # warm-up
    passes = []
    for _ in range(args.predict_passes):
        start = time.perf_counter()
        model.predict(x_test, batch_size=args.predict_batch_size, verbose=0)
        passes.append(time.perf_counter() - start)
    predict_seconds = statistics.median(passes)
    print(json.dumps({
        "stack": "keras", "tensorflow": tf.__version__, "model": args.model, "batch_size": args.batch_size,
        "lr": args.lr, "schedule": args.schedule, "label_smoothing": args.label_smoothing,
        "train_images": len(x_train), "epoch_seconds": timer.seconds,
        "epoch_accuracy": timer.accuracy, "predict_images_per_second": len(x_test) / predict_seconds,
    }))


if __name__ == "__main__":
    main()
