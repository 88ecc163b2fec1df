"""The compiled pass of an :class:`~camserve.explain.Explainer`: the model re-run with hooks on
its sites (:mod:`camserve.explain.tokens`), the targets' scalars (:mod:`camserve.targets`),
their gradients, every method's map per site, the fusion of several sites and the smoothing
(:mod:`camserve.explain.smoothing`).

Per (image, target) the pass differentiates one scalar: Σ_d W_d · S_d over one *space* S of
the flattened output (logits, probabilities, outputs, unit-length outputs), W the one-hot of
the class for class targets, else the target's weights. Several sites: each site's maps are
normalised to a peak of 1, resized to the input and averaged (raw: the normalised maps
averaged at the first site's resolution), then rescaled to a peak of 1.

>>> inp = keras.Input((4,))
>>> two = keras.Model(inp, [keras.layers.Dense(1, name="age")(inp), keras.layers.Dense(3, name="kind")(inp)])
>>> select_output(two, "age").output_shape
(None, 1)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from camserve import keras_graph as graph
from camserve.errors import InvalidArgument
from camserve.explain import layer_pass as lp
from camserve.explain import pixel, smoothing
from camserve.targets import LOGITS, PROBABILITIES

if TYPE_CHECKING:
    from camserve.explain.explainer import Explainer


def select_output(model: keras.Model, output: str | None) -> keras.Model:
    """``model`` with one output: the one named ``output`` (a model sharing the layers), or
    the model itself when it has one output and ``output`` is None or names it."""
    names = graph.output_names(model)
    if output is None:
        if len(names) != 1:
            raise InvalidArgument(
                f"model {model.name!r} has {len(names)} outputs; pick one with output=, one of {names}"
            )
        return model
    if output not in names:
        raise InvalidArgument(f"model {model.name!r} has no output {output!r}; outputs: {names}")
    if len(names) == 1:
        return model
    return keras.Model(model.inputs, model.outputs[names.index(output)], name=f"{model.name}_{output}")


def _activation_name(layer: Any) -> str:
    return getattr(getattr(layer, "activation", None), "__name__", "linear")


def forward(
    ex: Explainer,
    images,
    watch=None,
    replace: dict[int, Callable] | None = None,
    need_activations=True,
    hooks: dict[int, graph.Hook] | None = None,
):
    """(grids, logits, outputs) of one pass: ``grids`` each site's output as (B, h, w, C)
    (token sites reshaped; the model continues from the grid, so gradients reach it).
    ``watch(grid)`` sees each grid (the tape's watch); ``replace[s](raw)`` gives the grid
    that replaces site ``s``'s (Ablation-CAM; ``raw`` the layer's own output, None for 4-D
    sites, whose inputs are then unused); ``hooks``: more layer hooks (guided backprop)."""
    captured: dict[str, Any] = {}
    grids: dict[int, tf.Tensor] = {}
    out_layer = ex._output_layer

    def site_hook(s: int) -> Callable:
        site = ex.sites[s]

        def hook(call):
            def hooked(*args, **kwargs):
                if replace is not None and s in replace and site.prefix is None:
                    raw = grid = replace[s](None)  # what feeds the layer is unused
                else:
                    raw = call(*args, **kwargs)
                    grid = site.to_grid(raw) if replace is None or s not in replace else replace[s](raw)
                if watch is not None:
                    watch(grid)
                grids[s] = grid
                return site.to_layer(grid, raw) if site.prefix is not None else grid

            return hooked

        return hook

    def logits_hook(call):
        act = _activation_name(out_layer)

        def hooked(x, *args, **kwargs):
            # Gradients must see the pre-activation score even behind softmax/sigmoid.
            if isinstance(out_layer, keras.layers.Dense) and act != "linear":
                kernel = tf.convert_to_tensor(out_layer.kernel)
                logits = tf.matmul(tf.cast(x, kernel.dtype), kernel)  # mixed precision: float16 in
                if out_layer.use_bias:
                    logits = logits + tf.cast(out_layer.bias, kernel.dtype)
                captured["outputs"] = out_layer.activation(logits)
                return logits
            if isinstance(out_layer, (keras.layers.Softmax, keras.layers.Activation)):
                captured["outputs"] = call(x, *args, **kwargs)
                return x
            return call(x, *args, **kwargs)

        return hooked

    all_hooks = {**(hooks or {}), id(out_layer): logits_hook}
    if need_activations:
        for s, site in enumerate(ex.sites):
            all_hooks[id(site.layer)] = site_hook(s)
    logits = tf.cast(graph.run_with_hooks(ex.model, images, all_hooks), tf.float32)
    outputs = tf.cast(captured.get("outputs", logits), tf.float32)
    return [grids.get(s) for s in range(len(ex.sites))] if need_activations else [], logits, outputs


def resolve_classes(logits, targets, width: int, views: int = 1) -> tf.Tensor:
    """(V·B, T) classes: a target ≥ 0 is a class, −(r + 1) the r-th predicted class of the
    image (of its first view, when the batch holds ``views`` views of every image)."""
    if len(logits.shape) != 2:
        return tf.tile(tf.maximum(targets, 0), (views, 1))
    first = logits[: tf.shape(targets)[0]]
    classes = lp.target_classes(first, targets, width)
    return tf.tile(classes, (views, 1)) if views > 1 else classes


def target_values(ex: Explainer, spec: dict, classes, logits, outputs, rows=None, probability=False) -> tf.Tensor:
    """(S, T) scalars of the targets for the outputs of S inputs; ``rows`` (S,) the batch row
    of each input's targets (None: row i for input i). ``probability``: class-logit targets
    read the probability instead (Score-CAM)."""
    b = tf.shape(logits)[0]
    take = (lambda t: t) if rows is None else (lambda t: tf.gather(t, rows))
    classes, space, dense = take(classes), take(spec["space"]), take(spec["dense"])
    flat = tf.reshape(logits, (b, -1))
    outs = tf.reshape(outputs, (b, -1))
    spaces = tf.stack(
        [flat, tf.reshape(ex._probabilities(logits), (b, -1)), outs, tf.math.l2_normalize(outs, axis=-1)], axis=1
    )
    if probability:
        space = tf.where(tf.logical_and(tf.logical_not(dense), tf.equal(space, LOGITS)), PROBABILITIES, space)
    chosen = tf.gather(spaces, space, batch_dims=1)  # (S, T, D)
    weights = tf.one_hot(tf.maximum(classes, 0), tf.shape(flat)[1])
    if "weights" in spec:
        weights = tf.where(dense[..., None], take(spec["weights"]), weights)
    return tf.reduce_sum(weights * chosen, axis=-1)


def _resize(raw: tf.Tensor, size) -> tf.Tensor:
    """(…, h, w) maps resized bilinearly to ``size``."""
    shape = tf.shape(raw)
    flat = tf.reshape(raw, tf.concat([[-1], shape[-2:], [1]], axis=0))
    up = tf.image.resize(flat, size, method="bilinear")[..., 0]
    return tf.reshape(up, tf.concat([shape[:-2], size], axis=0))


def fuse(per_site: list[tf.Tensor], size) -> tuple[tf.Tensor, tf.Tensor]:
    """(raw, heatmap) of the sites' raw maps (B, T, M, h_s, w_s) at input ``size``."""
    heats = [smoothing.normalise(_resize(raw, size)) for raw in per_site]
    if len(per_site) == 1:
        return per_site[0], heats[0]
    first = tf.shape(per_site[0])[-2:]
    raw = tf.add_n([_resize(smoothing.normalise(r), first) for r in per_site]) / float(len(per_site))
    return raw, smoothing.normalise(tf.add_n(heats) / float(len(heats)))


def explain_pass(ex: Explainer, images, spec: dict, methods, width: int, scored: dict, aug: bool, eigen: bool):
    """The body of an "explain" graph: outputs, classes, target values, raw maps
    (B, T, M, h, w) and heatmaps (B, T, M, H, W)."""
    ex.trace_count += 1
    n = tf.shape(images)[0]
    x = smoothing.augmented(images) if aug else images
    views = len(smoothing.VIEWS) if aug else 1
    plain = "space" not in spec
    full = spec if plain else {k: smoothing.tiled(v) if aug else v for k, v in spec.items()}
    need_gradients = any(m.needs_gradients for m in methods)
    with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
        if len(ex.sites) == 1 and all(name in scored for name in lp.FORWARD):  # the prepare pass's, no gradients
            activations, logits, outputs = (scored[name] for name in lp.FORWARD)
            grids = [activations]
        else:
            grids, logits, outputs = forward(ex, x, watch=tape.watch if need_gradients else None)
        classes = resolve_classes(logits, spec["targets"], width, views)
        if plain:
            values = tf.gather(logits, classes, batch_dims=1)
        else:
            values = target_values(ex, full, classes, logits, outputs)
        sums = [tf.reduce_sum(values[:, t]) for t in range(width)]

    def scorer(rows_classes, s_logits, s_outputs, rows, probability):
        return target_values(ex, full, classes, s_logits, s_outputs, rows=rows, probability=probability)

    per_site, pixel_raw = [], None
    for s, grid in enumerate(grids):
        shared = lp.SharedPass(ex, x, grid, logits, classes, scored if s == 0 else {}, s, None if plain else scorer)
        site_methods = methods if s == 0 else tuple(m for m in methods if not m.pixel)  # pixel maps: once
        maps = []
        for t in range(width):
            gradients = tape.gradient(sums[t], grid) if need_gradients else None
            view = shared.for_target(t, gradients, None if plain else values[:, t])
            maps.append([tf.nn.relu(smoothing.method_map(m, view, eigen)) for m in site_methods])
        layer_raw, site_pixel = pixel.split_maps(maps, site_methods, shared.activations)  # (V·B, T, M, h, w)
        per_site.append(layer_raw)
        pixel_raw = site_pixel if s == 0 else pixel_raw
    raw, heat = fuse(per_site, tf.shape(images)[1:3])
    heat, extra = pixel.pixel_heatmaps(heat, pixel_raw)
    if aug:
        raw, heat = smoothing.deaugment(raw, heat)
        extra = {k: smoothing.views_mean(v) for k, v in extra.items()}
    out = {"outputs": outputs[:n], "classes": classes[:n], "values": values[:n], "raw": raw, "heatmap": heat}
    return out | extra
