"""Model repository: ``models/<name>/<version>/model.keras`` plus ``models/<name>/config.toml``.

The layout follows TensorFlow Serving / Triton: one folder per model, one numbered
sub-folder per version, the newest version served unless one is named.

>>> entry = load_model_dir("models/shapes_gap")            # doctest: +SKIP
>>> entry.config.class_names[:2], entry.version             # doctest: +SKIP
(['circle', 'square'], 1)
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

from camserve.errors import NotFound
from camserve.imaging import PREPROCESSORS

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ModelNotFound(NotFound):
    """An unknown model name or version (a gRPC NOT_FOUND)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What ``config.toml`` says about a model.

    ``input_size`` is (height, width); ``preprocessing`` is a key of
    :data:`camserve.imaging.PREPROCESSORS`; ``default_layer`` may be empty (automatic).
    """

    name: str
    class_names: tuple[str, ...]
    input_size: tuple[int, int]
    channels: int = 3
    preprocessing: str = "scale_0_1"
    default_layer: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_toml(cls, path: str | Path) -> "ModelConfig":
        """Read and validate ``config.toml``; errors name the file and the bad key."""
        path = Path(path)
        with open(path, "rb") as f:
            data = tomllib.load(f)
        try:
            class_names = tuple(str(c) for c in data["class_names"])
            h, w = (int(v) for v in data["input_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{path}: needs class_names = [..] and input_size = [height, width] ({e})"
            ) from None
        pre = data.get("preprocessing", "scale_0_1")
        if pre not in PREPROCESSORS:
            raise ValueError(
                f"{path}: unknown preprocessing {pre!r}; allowed: {sorted(PREPROCESSORS)}"
            )
        known = {"name", "class_names", "input_size", "channels", "preprocessing", "default_layer"}
        return cls(
            name=str(data.get("name", path.parent.name)),
            class_names=class_names,
            input_size=(h, w),
            channels=int(data.get("channels", 3)),
            preprocessing=pre,
            default_layer=data.get("default_layer") or None,
            extra={k: v for k, v in data.items() if k not in known},
        )


@dataclasses.dataclass
class ModelEntry:
    """A loaded model version with its configuration."""

    name: str
    version: int
    path: Path
    config: ModelConfig
    model: Any  # keras.Model


def check_model_name(name: str) -> str:
    """Reject names that could leave the repository (``..``, slashes, empty).

    >>> check_model_name("shapes_gap")
    'shapes_gap'
    """
    if not _NAME_RE.match(name or "") or ".." in name:
        raise ModelNotFound(
            f"invalid model name {name!r}: use letters, digits, '_', '-', '.' "
            "(no path separators, no '..')"
        )
    return name


def list_versions(model_dir: str | Path) -> list[int]:
    """Numbered version folders that hold a ``model.keras``, ascending."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and (p / "model.keras").is_file()
    )


def resolve_version(model_dir: str | Path, version: int | None = None) -> int:
    """The newest version, or ``version`` if it exists; ModelNotFound otherwise."""
    versions = list_versions(model_dir)
    if not versions:
        raise ModelNotFound(f"no versions with a model.keras under {model_dir}")
    if version is None or version == 0:
        return versions[-1]
    if version not in versions:
        raise ModelNotFound(
            f"model {Path(model_dir).name!r} has no version {version}; available: {versions}"
        )
    return version


def load_model_dir(model_dir: str | Path, version: int | None = None) -> ModelEntry:
    """Load one model folder (newest version by default) with Keras ``safe_mode=True``."""
    import keras

    model_dir = Path(model_dir)
    config_path = model_dir / "config.toml"
    if not config_path.is_file():
        raise ModelNotFound(f"{model_dir} has no config.toml")
    config = ModelConfig.from_toml(config_path)
    v = resolve_version(model_dir, version)
    path = model_dir / str(v) / "model.keras"
    model = keras.models.load_model(path, compile=False, safe_mode=True)
    return ModelEntry(name=model_dir.name, version=v, path=path, config=config, model=model)
