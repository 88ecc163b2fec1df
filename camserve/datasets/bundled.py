"""The two bundled shapes classifiers: architectures, deterministic training, evaluation.

``shapes_gap``: convolutions -> GlobalAveragePooling2D -> Dense(5, softmax), so CAM works.
``shapes_fc``: valid-padded convolutions and max pooling -> Flatten -> Dense -> Dense(5),
so the head converts exactly to a fully convolutional net (total stride 8).
Both take 64x64 RGB scaled to [0, 1] (``preprocessing = "scale_0_1"``; no Rescaling layer
inside the model).

>>> metrics = train_bundled("models", seed=0)     # doctest: +SKIP
>>> metrics["shapes_gap"]["test_accuracy"] >= 0.95  # doctest: +SKIP
True
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from camserve.datasets import shapes
from camserve.errors import InvalidArgument
from camserve.imaging import preprocess

INPUT_SIZE: tuple[int, int] = (64, 64)
PREPROCESSING = "scale_0_1"
GAP_LAST_CONV = "last_conv"
FC_LAST_CONV = "conv4"

#: Seeds of the data sets, offset from the training seed so that tests, the held-out
#: localization check and training never share scenes.
TRAIN_SEED, VAL_SEED, TEST_SEED, LOC_SEED, MULTI_SEED = 0, 1, 2, 3, 4
#: shapes_fc's shape sizes in training: at scales 1.0 and 0.7 objects of 16 to 68 px fall in range
FC_SHAPE_SIZE = (16.0, 48.0)
#: shapes_fc's [dense] settings in config.toml (see camserve.dense.detect.DetectionSettings)
FC_DENSE: dict[str, Any] = {
    "threshold": 0.5,
    "iou": 0.3,
    "nms": "agnostic",
    "scales": [1.0, 0.7],  # beat [1.2, 0.8] and three-scale pyramids on tuning scenes (bench)
    "margin": 32,
    "tight_box_model": "shapes_gap",  # its box-supervised CAM (shapes_fc's own CAMs do not localize)
    "tight_box_method": "cam",
    "tight_box_layer": "last_conv",
    "min_object_fraction": 0.25,  # trained shapes span at least 16 / 64 of the window
}


def build_gap_model(input_size: Sequence[int] = INPUT_SIZE, n_classes: int = 5) -> Any:
    """Convolutions (same padding, BatchNorm, ReLU) -> GAP -> Dense(softmax); last conv at 1/4 resolution.

    >>> build_gap_model().get_layer("last_conv").output.shape   # doctest: +SKIP
    (None, 16, 16, 64)
    """
    import keras
    from keras import layers

    h, w = input_size
    inp = keras.Input((h, w, 3), name="image")
    x = inp
    for name, filters in (
        ("conv1", 16),
        ("pool1", 0),
        ("conv2a", 32),
        ("conv2b", 32),
        ("pool2", 0),
        ("conv3a", 64),
        ("conv3b", 64),
    ):
        if not filters:
            x = layers.MaxPooling2D(2, name=name)(x)
            continue
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name)(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        x = layers.ReLU(name=f"{name}_relu")(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu", name=GAP_LAST_CONV)(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(n_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inp, out, name="shapes_gap")


def build_fc_model(input_size: Sequence[int] = INPUT_SIZE, n_classes: int = 5, hidden: int = 64) -> Any:
    """Valid-padded convolutions + max pooling -> Flatten -> Dense(relu) -> Dropout -> Dense(softmax).

    64 -> conv5 60 -> pool 30 -> conv3 28 -> pool 14 -> conv3 12 -> pool 6 -> conv3 4:
    every pooling input is even, so windows at multiples of the total stride 8 align.

    >>> build_fc_model().get_layer("flatten").output.shape   # doctest: +SKIP
    (None, 1024)
    """
    import keras
    from keras import layers

    h, w = input_size
    inp = keras.Input((h, w, 3), name="image")
    x = layers.Conv2D(16, 5, padding="valid", activation="relu", name="conv1")(inp)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(32, 3, padding="valid", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Conv2D(64, 3, padding="valid", activation="relu", name="conv3")(x)
    x = layers.MaxPooling2D(2, name="pool3")(x)
    x = layers.Conv2D(64, 3, padding="valid", activation="relu", name=FC_LAST_CONV)(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(hidden, activation="relu", name="fc1")(x)
    x = layers.Dropout(0.3, name="dropout")(x)
    out = layers.Dense(n_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inp, out, name="shapes_fc")


def to_input(images: np.ndarray) -> np.ndarray:
    """RGB uint8 images to the bundled models' float32 input (``scale_0_1``).

    >>> float(to_input(np.full((1, 2, 2, 3), 255, np.uint8)).max())
    1.0
    """
    return preprocess(images, PREPROCESSING)


def cam_localization(model: Any, images: np.ndarray, boxes: np.ndarray) -> dict[str, float]:
    """CAM localization on single-shape scenes with :class:`camserve.Explainer`: the share of
    images whose CAM box for the predicted class (heatmap upsampled bilinearly, divided by its
    peak, CAM paper's 20 % rule) has IoU >= 0.5 with the true box, and the mean IoU.

    >>> cam_localization(model, images, boxes)["localization_accuracy"]   # doctest: +SKIP
    0.96
    """
    from camserve import evaluation
    from camserve.explain import Explainer

    results = Explainer(model, layer=GAP_LAST_CONV).explain(to_input(images), methods=("cam",))
    pred = [r[0].box for r in results]
    ious = [evaluation.box_iou(p, tuple(b)) if p is not None else 0.0 for p, b in zip(pred, boxes)]
    return {
        "localization_accuracy": evaluation.localization_accuracy(pred, list(boxes)),
        "mean_iou": float(np.mean(ious)),
    }


def cam_localization_multi(model: Any, scenes: Sequence[shapes.Scene]) -> float:
    """CAM localization on scenes with several shapes: one CAM per (scene, class present),
    a hit when its box has IoU >= 0.5 with a shape of that class.

    >>> cam_localization_multi(model, shapes.make_scenes(100, seed=9))   # doctest: +SKIP
    0.9
    """
    from camserve import evaluation
    from camserve.explain import Explainer

    images = to_input(np.stack([s.image for s in scenes]))
    targets = [sorted(set(s.labels)) for s in scenes]
    results = Explainer(model, layer=GAP_LAST_CONV).explain(images, methods=("cam",), targets=targets)
    pred, truth = [], []
    for scene, result in zip(scenes, results):
        for e in result:
            pred.append(e.box)
            truth.append([b for b, l in zip(scene.boxes, scene.labels) if l == e.class_index])
    return evaluation.localization_accuracy(pred, truth)


def accuracy(model: Any, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` on RGB uint8 ``images``.

    >>> accuracy(model, images, labels)   # doctest: +SKIP
    0.99
    """
    probs = model.predict(to_input(images), batch_size=256, verbose=0)
    return float(np.mean(np.argmax(probs, axis=1) == labels))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one bundled model is built, fed and trained."""

    name: str
    build: Callable[[], Any]
    default_layer: str
    data: dict[str, Any]  # keyword arguments of shapes.make_dataset
    n_train: int
    epochs: int
    learning_rate: float
    batch_size: int = 64
    n_val: int = 1000
    n_test: int = 2000
    n_loc: int = 2000  # held-out scenes for CAM localization (GAP models)
    #: weight of a training-only loss on GAP models that makes the true class's CAM positive
    #: inside the ground-truth box and negative outside it (see :func:`_box_map_loss`).
    box_penalty: float = 0.0
    #: measure CAM localization after training (GAP models)
    evaluate_cam: bool = False
    #: share of extra windows cut from large scenes (shapes.make_windows) in each split;
    #: background windows (label -1) are trained towards ``background`` when named, else the
    #: uniform distribution
    window_fraction: float = 0.0
    windows: dict[str, Any] = dataclasses.field(default_factory=dict)  # keywords of make_windows
    #: a class of its own for windows with no centred shape (appended to the shape classes)
    background: str | None = None
    #: the model's ``[dense]`` settings (camserve.dense.detect.DetectionSettings), written to config.toml
    dense: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The shape classes, then the background class if any."""
        return shapes.CLASS_NAMES + ((self.background,) if self.background else ())


RECIPES: dict[str, Recipe] = {
    "shapes_gap": Recipe(
        name="shapes_gap",
        build=build_gap_model,
        default_layer=GAP_LAST_CONV,
        data={},  # shapes anywhere in the 64x64 scene
        n_train=16000,
        epochs=8,
        learning_rate=2e-3,
        box_penalty=0.5,
        evaluate_cam=True,
    ),
    "shapes_fc": Recipe(
        name="shapes_fc",
        build=functools.partial(build_fc_model, n_classes=len(shapes.CLASS_NAMES) + 1, hidden=128),
        default_layer=FC_LAST_CONV,
        # roughly centred, as in a sliding window at stride 8; sizes for a two-scale pyramid
        data={"centre_jitter": 4.0, "shape_size": FC_SHAPE_SIZE},
        window_fraction=0.6,
        windows={"margin": 32, "near_fraction": 0.5, "positive_fraction": 0.4, "shape_size": FC_SHAPE_SIZE},
        background="background",
        dense=FC_DENSE,
        n_train=20000,
        epochs=12,
        learning_rate=2e-3,
    ),
}


def _class_maps_layer(dense: Any) -> Any:
    """A training-only layer applying ``dense``'s own kernel at every location of the last
    conv: the class maps of CAM (no bias), whose spatial mean plus the bias is the logit."""
    import keras

    class ClassMaps(keras.layers.Layer):
        def __init__(self, head: Any) -> None:
            super().__init__(name="class_maps")
            self.head = head

        def call(self, x: Any) -> Any:
            return keras.ops.einsum("bhwk,kc->bhwc", x, self.head.kernel)

    return ClassMaps(dense)


def _box_map_loss(input_size: tuple[int, int]) -> Callable[[Any, Any], Any]:
    """Training-only loss on the true class's CAM logits s(p) = sum_k w_k A_k(p): binary
    cross-entropy of sigmoid(s(p)) against 1 for cells wholly inside the ground-truth box and
    0 for cells wholly outside it (cells on the box border are ignored). Targets are rows
    (label, x0, y0, x1, y1) in input pixels."""
    from keras import ops

    def loss(target: Any, maps: Any) -> Any:
        h, w = maps.shape[1], maps.shape[2]
        label = ops.cast(target[:, 0], "int32")
        s = ops.take_along_axis(maps, label[:, None, None, None], axis=-1)[..., 0]  # (B, h, w)
        sy, sx = input_size[0] / h, input_size[1] / w
        y0 = ops.arange(h, dtype="float32")[None] * sy  # (1, h) cell starts
        x0 = ops.arange(w, dtype="float32")[None] * sx
        box = [target[:, i : i + 1] for i in range(1, 5)]  # (B, 1) each: x0, y0, x1, y1
        in_y = ops.logical_and(y0 >= box[1], y0 + sy <= box[3])
        in_x = ops.logical_and(x0 >= box[0], x0 + sx <= box[2])
        out_y = ops.logical_or(y0 + sy <= box[1], y0 >= box[3])
        out_x = ops.logical_or(x0 + sx <= box[0], x0 >= box[2])
        inside = ops.cast(ops.logical_and(in_y[:, :, None], in_x[:, None, :]), s.dtype)
        outside = ops.cast(ops.logical_or(out_y[:, :, None], out_x[:, None, :]), s.dtype)
        # softplus(-s) = -log sigmoid(s), softplus(s) = -log(1 - sigmoid(s))
        bce = inside * ops.softplus(-s) + outside * ops.softplus(s)
        return ops.sum(bce, axis=(1, 2)) / ops.maximum(ops.sum(inside + outside, axis=(1, 2)), 1.0)

    return loss


def _trainer(model: Any, recipe: Recipe) -> tuple[Any, list[Any], list[Any], list[float], list[str]]:
    """A wrapper around ``model`` (sharing its weights) to compile and fit, with its losses,
    metrics, loss weights and the target each output needs ("label": soft class targets,
    "label_box": rows (label, x0, y0, x1, y1)). The
    saved model itself is never compiled, so it carries no optimizer state and no
    training-only losses."""
    import keras

    outs: list[Any] = [model.outputs[0]]
    losses: list[Any] = ["categorical_crossentropy"]  # names or loss functions
    metrics: list[Any] = [["categorical_accuracy"]]
    weights: list[float] = [1.0]
    targets: list[str] = ["label"]
    if recipe.box_penalty:
        acts = model.get_layer(recipe.default_layer).output
        outs.append(_class_maps_layer(model.layers[-1])(acts))
        losses.append(_box_map_loss(tuple(model.input_shape[1:3])))
        metrics.append([])
        weights.append(recipe.box_penalty)
        targets.append("label_box")
    return keras.Model(model.inputs[0], outs), losses, metrics, weights, targets


def _seed_for(seed: int, split: int) -> int:
    return 1000 * seed + split


def _split(recipe: Recipe, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, labels (-1 = background window) and boxes (zeros for windows) of one split."""
    n_win = int(round(n * recipe.window_fraction))
    x, y, b = shapes.make_dataset(n - n_win, seed, INPUT_SIZE, **recipe.data)
    if not n_win:
        return x, y, b
    xw, yw = shapes.make_windows(n_win, seed + 500, INPUT_SIZE, **recipe.windows)
    return np.concatenate([x, xw]), np.concatenate([y, yw]), np.concatenate([b, np.zeros((n_win, 4), b.dtype)])


def train_model(
    recipe: Recipe, seed: int = 0, epochs: int | None = None, verbose: int = 2
) -> tuple[Any, dict[str, Any]]:
    """Train one bundled model deterministically; returns (model, metrics).

    >>> model, metrics = train_model(RECIPES["shapes_fc"], seed=0, epochs=1)   # doctest: +SKIP
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    epochs = recipe.epochs if epochs is None else epochs

    t0 = time.perf_counter()
    x_tr, y_tr, b_tr = _split(recipe, recipe.n_train, _seed_for(seed, TRAIN_SEED))
    x_va, y_va, b_va = _split(recipe, recipe.n_val, _seed_for(seed, VAL_SEED))
    data_s = time.perf_counter() - t0

    model = recipe.build()
    trainer, losses, metrics, weights, targets = _trainer(model, recipe)
    n_classes = model.output_shape[-1]

    def dataset(x: np.ndarray, y: np.ndarray, boxes: np.ndarray, shuffle: bool) -> Any:
        label_box = np.concatenate([y[:, None], boxes], axis=1).astype(np.float32)
        ds = tf.data.Dataset.from_tensor_slices((x, y, label_box))
        if shuffle:
            ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)

        @tf.autograph.experimental.do_not_convert
        def prep(a: Any, label: Any, lb: Any) -> Any:
            # one-hot for a shape; for a background window (label -1) one-hot of the
            # background class (the last) when there is one, else uniform
            if recipe.background:
                label = tf.where(label >= 0, label, n_classes - 1)
            soft = tf.where(label[:, None] >= 0, tf.one_hot(label, n_classes), 1.0 / n_classes)
            wanted = {"label": soft, "label_box": lb}
            return tf.cast(a, tf.float32) / 255.0, tuple(wanted[t] for t in targets)

        return ds.batch(recipe.batch_size).map(prep).prefetch(2)

    steps = epochs * int(np.ceil(len(x_tr) / recipe.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(recipe.learning_rate, steps)
    trainer.compile(optimizer=keras.optimizers.Adam(schedule), loss=losses, loss_weights=weights, metrics=metrics)
    t1 = time.perf_counter()
    trainer.fit(
        dataset(x_tr, y_tr, b_tr, True),
        validation_data=dataset(x_va, y_va, b_va, False),
        epochs=epochs,
        verbose=verbose,
        shuffle=False,  # the tf.data pipeline shuffles, seeded
    )
    train_s = time.perf_counter() - t1

    x_te, y_te, _ = shapes.make_dataset(recipe.n_test, _seed_for(seed, TEST_SEED), INPUT_SIZE, **recipe.data)
    scores: dict[str, Any] = {
        "test_accuracy": round(accuracy(model, x_te, y_te), 4),
        "test_scenes": len(x_te),
        "train_scenes": len(x_tr),
        "epochs": epochs,
        "data_seconds": round(data_s, 1),
        "train_seconds": round(train_s, 1),
    }
    if recipe.window_fraction:
        x_w, y_w = shapes.make_windows(recipe.n_test, _seed_for(seed, TEST_SEED) + 500, INPUT_SIZE, **recipe.windows)
        probs = model.predict(to_input(x_w), batch_size=256, verbose=0)
        pos = y_w >= 0
        scores["window_accuracy"] = round(float(np.mean(probs[pos].argmax(axis=1) == y_w[pos])), 4)
        if recipe.background:  # the background class wins
            rejected = probs[~pos].argmax(axis=1) == len(recipe.class_names) - 1
        else:  # no shape class reaches 0.5
            rejected = probs[~pos].max(axis=1) < 0.5
        scores["background_rejection"] = round(float(np.mean(rejected)), 4)
        scores["test_windows"] = len(x_w)
    if recipe.evaluate_cam:
        x_lo, _, b_lo = shapes.make_dataset(recipe.n_loc, _seed_for(seed, LOC_SEED), INPUT_SIZE)
        loc = cam_localization(model, x_lo, b_lo)
        scores["cam_localization_accuracy"] = round(loc["localization_accuracy"], 4)
        scores["cam_mean_iou"] = round(loc["mean_iou"], 4)
        scores["localization_scenes"] = len(x_lo)
        multi = shapes.make_scenes(recipe.n_loc // 4, _seed_for(seed, MULTI_SEED), INPUT_SIZE, n_shapes=(2, 3))
        scores["cam_localization_multi_shape"] = round(cam_localization_multi(model, multi), 4)
        scores["multi_shape_scenes"] = len(multi)
    return model, scores


def describe_objective(recipe: Recipe) -> str:
    """One line saying what the training minimised, for ``config.toml``.

    >>> describe_objective(RECIPES["shapes_gap"]).split(" + ")[0]
    'softmax cross-entropy on single-shape scenes'
    """
    data = "single-shape scenes"
    if recipe.window_fraction:
        target = f"the class '{recipe.background}'" if recipe.background else "the uniform distribution"
        data += (
            f" ({1 - recipe.window_fraction:.0%}) and windows cut from 192 px scenes with one to three"
            f" shapes ({recipe.window_fraction:.0%}; background windows target {target})"
        )
    parts = [f"softmax cross-entropy on {data}"]
    if recipe.box_penalty:
        parts.append(
            f"{recipe.box_penalty} x box-supervised CAM loss (true-class CAM logits positive in "
            "cells inside the ground-truth box, negative outside)"
        )
    return " + ".join(parts)


_TRAINING_KEYS = ("train_scenes", "epochs", "data_seconds", "train_seconds")


def _machine() -> str:
    """The machine the timings were taken on, e.g. "CPU-only, 2 cores, AMD EPYC"."""
    import os
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU-only, {os.cpu_count()} cores, {model}"


def write_config(path: Path, recipe: Recipe, metrics: dict[str, Any], seed: int, command: str) -> None:
    """Write ``models/<name>/config.toml`` in the repository format, metrics under ``[metrics]``."""

    def value(v: Any) -> str:
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    lines = [
        f'name = "{recipe.name}"',
        "class_names = [" + ", ".join(f'"{c}"' for c in recipe.class_names) + "]",
        *([f'background_class = "{recipe.background}"'] if recipe.background else []),
        f"input_size = [{INPUT_SIZE[0]}, {INPUT_SIZE[1]}]  # height, width",
        "channels = 3",
        f'preprocessing = "{PREPROCESSING}"',
        f'default_layer = "{recipe.default_layer}"',
        *(["", "[dense]", *(f"{k} = {value(v)}" for k, v in recipe.dense.items())] if recipe.dense else []),
        "",
        "[training]",
        f"seed = {seed}",
        f"command = {value(command)}",
        f"objective = {value(describe_objective(recipe))}",
        *(f"{k} = {value(v)}" for k, v in metrics.items() if k in _TRAINING_KEYS),
        f"machine = {value(_machine())}",
        "",
        "[metrics]",
        *(f"{k} = {value(v)}" for k, v in metrics.items() if k not in _TRAINING_KEYS),
        "",
    ]
    path.write_text("\n".join(lines))


def train_bundled(
    out_dir: str | Path = "models",
    seed: int = 0,
    epochs: int | None = None,
    names: Sequence[str] = tuple(RECIPES),
    command: str = "camserve train-bundled",
    overrides: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Train and write ``<out_dir>/<name>/1/model.keras`` and ``<out_dir>/<name>/config.toml``
    for each bundled model; returns the metrics per model. ``overrides`` replaces
    :class:`Recipe` fields of every model (e.g. ``{"n_train": 64}`` for a smoke run).

    >>> train_bundled("/tmp/models", names=["shapes_fc"], epochs=1)   # doctest: +SKIP
    """
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise InvalidArgument(f"unknown bundled model(s) {unknown}; allowed: {list(RECIPES)}")
    results = {}
    for name in names:
        recipe = dataclasses.replace(RECIPES[name], **(overrides or {}))
        model, metrics = train_model(recipe, seed=seed, epochs=epochs)
        folder = Path(out_dir) / name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        model.save(folder / "1" / "model.keras")
        write_config(folder / "config.toml", recipe, metrics, seed, command)
        tight_model = recipe.dense.get("tight_box_model")
        if tight_model and not (Path(out_dir) / tight_model).is_dir():
            print(f"{name}: no detection figures: its tight-box model {tight_model!r} is not in {out_dir}")
        elif recipe.dense:  # measured as `camserve dense` runs: with the config just written
            from camserve.datasets.detection_figures import recorded_detection_metrics

            metrics.update(recorded_detection_metrics(folder))
            write_config(folder / "config.toml", recipe, metrics, seed, command)
        results[name] = metrics
    return results
