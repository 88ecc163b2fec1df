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

from camserve.errors import InvalidArgument, NotFound, Unavailable
from camserve.imaging import PREPROCESSORS

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ModelNotFound(NotFound):
    """An unknown model name or version (a gRPC NOT_FOUND)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What ``config.toml`` says about a model.

    ``input_size`` is (height, width); ``preprocessing`` is a key of
    :data:`camserve.imaging.PREPROCESSORS`; ``default_layer`` may be empty (automatic);
    ``prefix_tokens``: the class / register tokens before the patch tokens of a transformer's
    token layers (None: inferred, see :mod:`camserve.explain.tokens`).
    """

    name: str
    class_names: tuple[str, ...]
    input_size: tuple[int, int]
    channels: int = 3
    preprocessing: str = "scale_0_1"
    default_layer: str | None = None
    prefix_tokens: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_toml(cls, path: str | Path) -> ModelConfig:
        """Read and validate ``config.toml``; errors name the file and the bad key."""
        path = Path(path)
        with open(path, "rb") as f:
            data = tomllib.load(f)
        try:
            class_names = tuple(str(c) for c in data["class_names"])
            h, w = (int(v) for v in data["input_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidArgument(f"{path}: needs class_names = [..] and input_size = [height, width] ({e})") from None
        pre = data.get("preprocessing", "scale_0_1")
        if pre not in PREPROCESSORS:
            raise InvalidArgument(f"{path}: unknown preprocessing {pre!r}; allowed: {sorted(PREPROCESSORS)}")
        prefix = data.get("prefix_tokens")
        if prefix is not None and (isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0):
            raise InvalidArgument(f"{path}: prefix_tokens must be an integer >= 0 (omit it: inferred), got {prefix!r}")
        known = {"name", "class_names", "input_size", "channels", "preprocessing", "default_layer", "prefix_tokens"}
        return cls(
            name=str(data.get("name", path.parent.name)),
            class_names=class_names,
            input_size=(h, w),
            channels=int(data.get("channels", 3)),
            preprocessing=pre,
            default_layer=data.get("default_layer") or None,
            prefix_tokens=prefix,
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
            f"invalid model name {name!r}: use letters, digits, '_', '-', '.' (no path separators, no '..')"
        )
    return name


def list_versions(model_dir: str | Path) -> list[int]:
    """Numbered version folders that hold a ``model.keras``, ascending."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and (p / "model.keras").is_file()
    )


def resolve_version(model_dir: str | Path, version: int | None = None) -> int:
    """The newest version, or ``version`` if it exists; ModelNotFound otherwise."""
    versions = list_versions(model_dir)
    if not versions:
        raise ModelNotFound(f"no versions with a model.keras under {model_dir}")
    if version is None or version == 0:
        return versions[-1]
    if version not in versions:
        raise ModelNotFound(f"model {Path(model_dir).name!r} has no version {version}; available: {versions}")
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


# ---------------------------------------------------------------------------- a whole repository


class ModelUnavailable(Unavailable):
    """A model (or version) that exists but failed to load or is still loading (UNAVAILABLE)."""


@dataclasses.dataclass
class ModelStatus:
    """One model folder of a :class:`ModelRepository`: what is on disk, what loaded, why not.

    ``entries`` maps loaded versions to their :class:`ModelEntry`; ``errors`` maps versions
    (0 for the model as a whole, e.g. a bad ``config.toml``) to the reason they failed.
    """

    name: str
    path: Path
    versions: list[int]
    config: ModelConfig | None = None
    entries: dict[int, ModelEntry] = dataclasses.field(default_factory=dict)
    errors: dict[int, str] = dataclasses.field(default_factory=dict)
    loaded: bool = False  # load attempted

    @property
    def available(self) -> bool:
        return bool(self.entries)

    @property
    def default_version(self) -> int | None:
        """The newest version that loaded."""
        return max(self.entries) if self.entries else None

    @property
    def reason(self) -> str:
        """Why (some of) the model is unavailable; empty when everything loaded."""
        if not self.loaded:
            return "loading"
        return "; ".join((f"version {v}: {msg}" if v else msg) for v, msg in sorted(self.errors.items()))


class ModelRepository:
    """Every model under a root folder (``<root>/<name>/<version>/model.keras`` plus
    ``<root>/<name>/config.toml``), loaded with Keras ``safe_mode=True``.

    A model or version that fails to load is recorded with its reason and the others serve.
    Requests name models only through :meth:`get`, which looks names up among the folders
    found by the scan: no request string is ever joined into a path.
    ``version_policy``: "all" loads every version, "latest" only the newest on disk.

    >>> repo = ModelRepository("models"); repo.load()                 # doctest: +SKIP
    >>> repo.get("shapes_gap").version                                 # doctest: +SKIP
    1
    """

    def __init__(self, root: str | Path, version_policy: str = "all") -> None:
        if version_policy not in ("all", "latest"):
            raise InvalidArgument(f"version_policy must be 'all' or 'latest', got {version_policy!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a folder")
        self.version_policy = version_policy
        self.models: dict[str, ModelStatus] = {}
        self.scan()

    def scan(self) -> None:
        """Find model folders: valid names holding a config.toml or numbered versions."""
        found: dict[str, ModelStatus] = {}
        for d in sorted(self.root.iterdir()):
            if not d.is_dir() or not _NAME_RE.match(d.name) or ".." in d.name:
                continue
            has_versions = any(p.is_dir() and p.name.isdigit() for p in d.iterdir())
            if not (d / "config.toml").is_file() and not has_versions:
                continue
            found[d.name] = self.models.get(d.name) or ModelStatus(d.name, d, list_versions(d))
        self.models = found

    def load(self, names: list[str] | None = None) -> None:
        """Load (or reload) the named models, all by default; failures are recorded."""
        for name in names if names is not None else list(self.models):
            self.models[name] = self._load_one(self.models[name].path)

    def _load_one(self, model_dir: Path) -> ModelStatus:
        status = ModelStatus(model_dir.name, model_dir, list_versions(model_dir))
        try:
            status.config = ModelConfig.from_toml(model_dir / "config.toml")
        except FileNotFoundError:
            status.errors[0] = f"{model_dir / 'config.toml'} is missing"
        except (ValueError, OSError, tomllib.TOMLDecodeError) as e:
            status.errors[0] = f"bad config.toml: {e}"
        if not status.versions and not status.errors:
            status.errors[0] = f"no version folder with a model.keras under {model_dir}"
        versions = status.versions if self.version_policy == "all" else status.versions[-1:]
        if status.config is not None:
            for v in versions:
                try:
                    status.entries[v] = load_model_dir(model_dir, v)
                except Exception as e:  # noqa: BLE001 - any broken file makes only this version unavailable
                    status.errors[v] = f"failed to load {model_dir / str(v) / 'model.keras'}: {type(e).__name__}: {e}"
        status.loaded = True
        return status

    def names(self) -> list[str]:
        return sorted(self.models)

    def status(self, name: str) -> ModelStatus:
        """The :class:`ModelStatus` of ``name``; ModelNotFound lists the known names."""
        check_model_name(name)
        try:
            return self.models[name]
        except KeyError:
            raise ModelNotFound(f"unknown model {name!r}; available: {self.names()}") from None

    def mark_failed(self, name: str, version: int, reason: str) -> None:
        """Record that a loaded version cannot serve after all (e.g. its warm-up failed): it
        leaves the loaded entries and ``reason`` is reported for it."""
        st = self.status(name)
        st.entries.pop(version, None)
        st.errors[version] = reason

    def get(self, name: str, version: int | None = None) -> ModelEntry:
        """The loaded entry of ``name`` (newest loaded version when ``version`` is None or 0).

        ModelNotFound for unknown names / versions; ModelUnavailable when it did not load.
        """
        st = self.status(name)
        if not version:
            if st.default_version is None:
                raise ModelUnavailable(f"model {name!r} is unavailable: {st.reason or 'no version loaded'}")
            return st.entries[st.default_version]
        if version in st.entries:
            return st.entries[version]
        if version in st.errors:
            raise ModelUnavailable(f"model {name!r} version {version} is unavailable: {st.errors[version]}")
        if not st.loaded and version in st.versions:
            raise ModelUnavailable(f"model {name!r} version {version} is still loading")
        raise ModelNotFound(f"model {name!r} has no version {version}; available: {sorted(st.entries)}")
