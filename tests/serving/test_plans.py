"""What a request's parameters resolve to before anything is queued (camserve.serving.plans):
an Explain plan's methods, targets, batch key, work units and answer size, against a
hand count; refusals name the budget or limit and what was counted."""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

import pytest
from helpers_serving import save_model, tiny_gap

from camserve import errors
from camserve.serving import budget
from camserve.serving.budget import Outputs, WorkBudget
from camserve.serving.jobs import ExplainKey
from camserve.serving.plans import Limits, explain_plan
from camserve.serving.repository import ModelRepository
from camserve.serving.runtime import ExplainerSettings, ModelRuntime, ModelRuntimes

IMAGE = type("Declared", (), {})  # the plans read images only for overlays' sizes and their count


@pytest.fixture(scope="module")
def runtime(tmp_path_factory) -> ModelRuntime:
    root: Path = tmp_path_factory.mktemp("models")
    save_model(root, "gap", 1, tiny_gap(1))
    runtimes = ModelRuntimes(ModelRepository(root), ExplainerSettings(max_batch_size=2))

    async def on_model(name: str, available: bool) -> None:
        pass

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        asyncio.run(runtimes.load_all(pool, on_model))
    return runtimes.get("gap")


def plan(rt: ModelRuntime, limits: Limits, n: int = 2, **kw):
    args = dict(methods=("gradcam", "cam"), targets=None, top_k=2, outputs=Outputs(heatmap=True))
    args.update(kw)
    return explain_plan(
        rt,
        rt.default_explainer,
        "",
        [IMAGE()] * n,
        args["methods"],
        args["targets"],
        args["top_k"],
        args["outputs"],
        aug_smooth=False,
        eigen_smooth=False,
        limits=limits,
    )


def test_an_explain_plan_counts_images_targets_and_methods(runtime) -> None:
    limits = Limits(WorkBudget(100), 64 << 20)
    p = plan(runtime, limits)
    assert p.methods == ("gradcam", "cam")  # the request's order for the answer ...
    assert p.key == ExplainKey("gap", 1, "last_conv", ("cam", "gradcam"), (32, 32, 3), top_k=2)  # ... sorted to batch
    assert (p.layer, p.explainer, p.targets) == ("", runtime.default_explainer, None)
    assert p.cost.units == 2 * 2 * 2  # images × targets × methods
    # The answer's estimate: per image 2 targets × 2 methods, each with a 32×32 float32 heatmap.
    assert 2 * 2 * 2 * 32 * 32 * 4 < p.answer_bytes < 2 * (2 * 2 * 32 * 32 * 4 + 4096)
    named = plan(runtime, limits, targets=[[1, 3], [0]])
    assert named.targets == [[1, 3], [0]] and named.key.top_k is None and named.cost.units == (2 + 1) * 2


def test_a_plan_over_the_budget_or_the_message_limit_is_refused_naming_it(runtime) -> None:
    with pytest.raises(
        errors.InvalidArgument, match=r"8 work units \(2 images × 2 targets × 2 methods\), .* max_work_units=7"
    ):
        plan(runtime, Limits(WorkBudget(7), 64 << 20))
    with pytest.raises(errors.ResourceExhausted, match="max_message_mb"):
        plan(runtime, Limits(WorkBudget(100), 1000))
    with pytest.raises(errors.InvalidArgument, match="3 target lists for 2 images"):
        plan(runtime, Limits(WorkBudget(100), 64 << 20), targets=[[0]] * 3)
    assert budget.per_channel("scorecam")  # Score-CAM counts channels, once per image:
    channels = plan(runtime, Limits(WorkBudget(10_000), 64 << 20), methods=("scorecam",), top_k=1)
    assert channels.cost.units == 2 * runtime.geometry(runtime.default_explainer).channels
