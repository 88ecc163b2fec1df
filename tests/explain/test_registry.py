"""The method registry as an API: a method registered after import is explained like a built-in,
checked against Grad-CAM (doubled) from the same pass and from a plain GradientTape."""

from __future__ import annotations

import numpy as np
import pytest
from models_for_tests import gap_model, images, linear_twin
from test_methods import assert_matches, ref_gradcam, tape_pass

from camserve import Explainer
from camserve.errors import InvalidArgument
from camserve.explain import METHODS
from camserve.explain.methods import UnknownMethod, gradcam, register, unregister


def test_a_method_registered_after_import_is_explained_like_a_builtin():
    model = gap_model(head="separate")
    x = images(3, 24, seed=9)
    ex = Explainer(model)  # made before the registration: it must still see the new method
    targets = [[0, 2], [1], [4, 3]]
    assert "gradcam_x2" not in ex.methods
    with pytest.raises(UnknownMethod, match="gradcam_x2"):
        ex.explain(x, methods=("gradcam_x2",), targets=targets)

    @register("gradcam_x2", needs_gradients=True)
    def gradcam_x2(p):
        """Twice Grad-CAM."""
        return 2.0 * gradcam(p)

    try:
        assert Explainer.methods[-1] == ex.methods[-1] == "gradcam_x2"
        assert METHODS["gradcam_x2"].doc == "Twice Grad-CAM." and METHODS["gradcam_x2"].needs_gradients
        results = ex.explain(x, methods=("gradcam_x2", "gradcam"), targets=targets)
        for i, row in enumerate(results):
            doubled, plain = row[0::2], row[1::2]
            assert [e.method for e in doubled] == ["gradcam_x2"] * len(targets[i])
            assert [e.class_index for e in doubled] == targets[i]
            for d, g in zip(doubled, plain):
                assert g.raw.max() > 0
                np.testing.assert_allclose(d.raw, 2.0 * g.raw, rtol=1e-6, atol=0)
                np.testing.assert_allclose(d.heatmap, g.heatmap, rtol=1e-5, atol=1e-6)  # same map once normalised
        # the reference: the plain tape's Grad-CAM, doubled
        a, g, _ = tape_pass(linear_twin(model), x, np.array([[0, 2], [1, 1], [4, 3]]))
        for i in range(len(targets)):
            for t, e in enumerate(results[i][0::2]):
                assert_matches(
                    e.raw.astype(np.float64), 2.0 * ref_gradcam(a[i : i + 1], g[i : i + 1, t])[0], 1e-5, "x2"
                )
        # a second registration of the name is refused unless it asks to replace
        with pytest.raises(InvalidArgument, match="already registered"):
            register("gradcam_x2")(gradcam)
        with pytest.raises(InvalidArgument, match="already registered"):
            register("gradcam", needs_gradients=True)(gradcam)
        register("gradcam_x2", needs_gradients=True, replace=True)(lambda p: 3.0 * gradcam(p))
        tripled = ex.explain(x[:1], methods=("gradcam_x2", "gradcam"), targets=[[0]])[0]
        np.testing.assert_allclose(tripled[0].raw, 3.0 * tripled[1].raw, rtol=1e-6, atol=0)  # not the cached graph
    finally:
        unregister("gradcam_x2")
    assert "gradcam_x2" not in METHODS and "gradcam_x2" not in ex.methods
    with pytest.raises(UnknownMethod, match="gradcam_x2"):
        unregister("gradcam_x2")
    with pytest.raises(InvalidArgument, match="method name"):
        register("")
