"""Bulk explanation beyond one machine, on Ray Data (``camserve bulk``): inputs
(:mod:`~camserve.bulk.inputs`), actors holding one Explainer each (:mod:`~camserve.bulk.actors`),
the Parquet output (:mod:`~camserve.bulk.output`) and the resumable job (:mod:`~camserve.bulk.job`).

Ray is imported only when a job runs (``pip install "camserve[bulk]"``); importing this package
needs neither Ray nor TensorFlow.

>>> summary = run_bulk(["samples/"], BulkSettings(model_dir="models/shapes_gap", out="out"))  # doctest: +SKIP
>>> summary.failed                                                                             # doctest: +SKIP
0
"""

from camserve.bulk.actors import BulkSettings, ExplainActor
from camserve.bulk.inputs import resolve_inputs
from camserve.bulk.job import Summary, ray_session, run_bulk
from camserve.bulk.output import raw_map, read_explanations

__all__ = [
    "BulkSettings",
    "ExplainActor",
    "Summary",
    "ray_session",
    "raw_map",
    "read_explanations",
    "resolve_inputs",
    "run_bulk",
]
