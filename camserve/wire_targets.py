"""Wire conversion of explanation targets (camserve.v1 ``Target``, ``TargetList``), shared by
the client and the server and re-exported by :mod:`camserve.wire`: class indices and names,
and the :mod:`camserve.targets` objects (probability, regression, segmentation masks and
similarity references as FloatMaps, multi-label thresholds).

>>> target_from_proto(target_to_proto(RegressionTarget(2, sign=-1)))
RegressionTarget(index=2, sign=-1)
>>> target_to_proto(ClassTarget("cat", probability=True))
name: "cat"
probability: true
<BLANKLINE>
"""

from __future__ import annotations

from typing import Any

import numpy as np

from camserve import targets as tg
from camserve.errors import InvalidArgument
from camserve.proto import pb
from camserve.targets import ClassTarget, RegressionTarget


def _maps() -> Any:
    from camserve import wire  # its float maps (wire imports this module at its end)

    return wire


__all__ = ["ClassTarget", "RegressionTarget", "target_from_proto", "target_to_proto", "targets_to_proto"]


def target_from_proto(t: pb.Target) -> Any:
    """A wire Target as the library takes it: an int index, a class name, or a
    :mod:`camserve.targets` object."""
    kind = t.WhichOneof("target")
    if kind is None:
        raise InvalidArgument("empty target: set index, name, regression, segmentation, similarity or multi_label")
    if kind in ("index", "name"):
        c = int(t.index) if kind == "index" else str(t.name)
        return tg.ClassTarget(c, probability=True) if t.probability else c
    if kind == "regression":
        return tg.RegressionTarget(int(t.regression.index), -1 if t.regression.negative else 1)
    if kind == "segmentation":
        seg = t.segmentation
        which = seg.WhichOneof("category")
        if which is None or not seg.HasField("mask"):
            raise InvalidArgument("a segmentation target needs class_index or class_name, and a mask")
        c = int(seg.class_index) if which == "class_index" else str(seg.class_name)
        return tg.SegmentationTarget(c, _maps().floatmap_to_array(seg.mask, "SegmentationTarget.mask"))
    if kind == "similarity":
        return tg.SimilarityTarget(_maps().floatmap_to_array(t.similarity.reference, "SimilarityTarget.reference"))
    return tg.MultiLabelTarget(float(t.multi_label.threshold) or 0.5)


def target_to_proto(t: Any) -> pb.Target:
    """A class index or name, or a :mod:`camserve.targets` object, as a wire Target."""
    if isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_)):
        return pb.Target(index=int(t))
    if isinstance(t, str):
        return pb.Target(name=t)
    if isinstance(t, tg.ClassTarget):
        proto = target_to_proto(t.index_or_name)
        proto.probability = bool(t.probability)
        return proto
    if isinstance(t, tg.RegressionTarget):
        return pb.Target(regression=pb.RegressionTarget(index=int(t.index), negative=t.sign < 0))
    if isinstance(t, tg.SegmentationTarget):
        mask = _maps().array_to_floatmap(np.asarray(t.mask, np.float32))
        c = t.class_index
        category = {"class_name": c} if isinstance(c, str) else {"class_index": int(c)}
        return pb.Target(segmentation=pb.SegmentationTarget(mask=mask, **category))
    if isinstance(t, tg.SimilarityTarget):
        ref = _maps().array_to_floatmap(np.asarray(t.reference, np.float32).reshape(-1))
        return pb.Target(similarity=pb.SimilarityTarget(reference=ref))
    if isinstance(t, tg.MultiLabelTarget):
        return pb.Target(multi_label=pb.MultiLabelTarget(threshold=float(t.threshold)))
    raise InvalidArgument(f"target {t!r}: use a class index (int), a class name (str) or a camserve.targets object")


def targets_to_proto(targets: Any, n_images: int) -> list[pb.TargetList]:
    """Targets as the library takes them (None; one int / name for all images; or per image an
    int, a name or a list of them) as wire TargetLists (one per image)."""
    if targets is None:
        return []
    if tg.is_target(targets):
        return [pb.TargetList(targets=[target_to_proto(targets)])]
    targets = list(targets)
    if len(targets) != n_images:
        raise InvalidArgument(f"{len(targets)} target entries for {n_images} images: give one per image")
    out = []
    for t in targets:
        ts = [t] if tg.is_target(t) else list(t)
        out.append(pb.TargetList(targets=[target_to_proto(x) for x in ts]))
    return out
