"""ModelRepository: scan, load with safe_mode, failures recorded, versions, names confined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers_serving import make_repository, save_model, tiny_gap, write_config

from camserve.serving.repository import ModelNotFound, ModelRepository, ModelUnavailable


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> ModelRepository:
    root = make_repository(tmp_path_factory.mktemp("models"))
    (root / "notes").mkdir()  # not a model: ignored
    (root / "README.md").write_text("hi")
    r = ModelRepository(root)
    r.load()
    return r


def test_scan_finds_models_only(repo: ModelRepository) -> None:
    assert repo.names() == ["broken", "fc", "gap"]


def test_newest_version_by_default_and_named(repo: ModelRepository) -> None:
    assert repo.get("gap").version == 2
    assert repo.get("gap", 0).version == 2
    v1 = repo.get("gap", 1)
    assert v1.version == 1 and v1.config.class_names[0] == "circle"
    x = np.random.default_rng(0).random((1, 32, 32, 3), np.float32)
    # The two versions are different models (different seeds), served side by side.
    assert not np.allclose(v1.model.predict(x, verbose=0), repo.get("gap").model.predict(x, verbose=0))


def test_unknown_names_and_versions(repo: ModelRepository) -> None:
    with pytest.raises(ModelNotFound, match=r"unknown model 'nope'; available: \['broken', 'fc', 'gap'\]"):
        repo.get("nope")
    with pytest.raises(ModelNotFound, match=r"has no version 7; available: \[1, 2\]"):
        repo.get("gap", 7)


@pytest.mark.parametrize("name", ["../gap", "gap/../../etc", "/etc/passwd", "", "..", "a\\b"])
def test_names_cannot_escape(repo: ModelRepository, name: str) -> None:
    with pytest.raises(ModelNotFound):
        repo.get(name)


def test_corrupt_model_unavailable_others_serve(repo: ModelRepository) -> None:
    st = repo.status("broken")
    assert not st.available and st.loaded
    assert "failed to load" in st.reason and "model.keras" in st.reason
    with pytest.raises(ModelUnavailable, match="model 'broken' is unavailable: version 1: failed to load"):
        repo.get("broken")
    assert repo.status("fc").available and repo.status("fc").reason == ""


def test_unsafe_lambda_refused_by_safe_mode(tmp_path: Path) -> None:
    import keras

    inp = keras.Input((8, 8, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(4)(x)
    save_model(tmp_path, "lam", 1, keras.Model(inp, out), size=8)
    r = ModelRepository(tmp_path)
    r.load()
    assert not r.status("lam").available
    assert "failed to load" in r.status("lam").reason


def test_bad_config_and_missing_versions(tmp_path: Path) -> None:
    (tmp_path / "noconf" / "1").mkdir(parents=True)
    write_config(tmp_path / "empty", "empty")
    (tmp_path / "badconf").mkdir()
    (tmp_path / "badconf" / "config.toml").write_text("class_names = 3\n")
    r = ModelRepository(tmp_path)
    r.load()
    assert "config.toml is missing" in r.status("noconf").reason
    assert "no version folder" in r.status("empty").reason
    assert "bad config.toml" in r.status("badconf").reason
    assert r.status("badconf").available is False


def test_latest_policy_and_broken_newest_version(tmp_path: Path) -> None:
    save_model(tmp_path, "m", 1, tiny_gap(1))
    (tmp_path / "m" / "3").mkdir()
    (tmp_path / "m" / "3" / "model.keras").write_bytes(b"garbage")
    r = ModelRepository(tmp_path)
    r.load()
    assert r.get("m").version == 1  # the newest that loaded
    with pytest.raises(ModelUnavailable, match="version 3 is unavailable"):
        r.get("m", 3)
    latest = ModelRepository(tmp_path, version_policy="latest")
    latest.load()
    with pytest.raises(ModelUnavailable):
        latest.get("m")
    with pytest.raises(ValueError, match="version_policy"):
        ModelRepository(tmp_path, version_policy="some")


def test_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        ModelRepository(tmp_path / "missing")


def test_loading_state_reported(tmp_path: Path) -> None:
    save_model(tmp_path, "m", 1, tiny_gap(1))
    r = ModelRepository(tmp_path)  # scanned, not loaded
    assert r.status("m").reason == "loading"
    with pytest.raises(ModelUnavailable, match="loading"):
        r.get("m")


def test_mark_failed_takes_a_loaded_version_out_of_service(tmp_path: Path) -> None:
    save_model(tmp_path, "gap", 1, tiny_gap(1))
    save_model(tmp_path, "gap", 2, tiny_gap(2))
    r = ModelRepository(tmp_path)
    r.load()
    r.mark_failed("gap", 2, "warm-up failed: RuntimeError: out of memory")
    assert r.get("gap").version == 1  # the newest version that still serves
    with pytest.raises(ModelUnavailable, match="version 2 is unavailable: warm-up failed: RuntimeError: out of memory"):
        r.get("gap", 2)
    st = r.status("gap")
    assert st.available and st.reason == "version 2: warm-up failed: RuntimeError: out of memory"
    r.mark_failed("gap", 1, "warm-up failed: boom")
    assert not r.status("gap").available
    with pytest.raises(ModelUnavailable, match="model 'gap' is unavailable: version 1: warm-up failed: boom"):
        r.get("gap")
    with pytest.raises(ModelNotFound):
        r.mark_failed("nope", 1, "x")
