"""``camserve models``: the models of a server or of a local repository; server health.

camserve models --server localhost:8500            # what a running server serves
camserve models --repository models                # load a local repository and report
camserve models --server localhost:8500 --health   # exit 0 when SERVING (container probes)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from camserve.cli import add_command, load_tensorflow, log_level


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "models", "list a server's (or a local repository's) models; check health", __doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", help="HOST:PORT of a camserve server (or a gRPC target such as dns:///name:8500)")
    src.add_argument("--repository", help="a local model repository folder")
    p.add_argument(
        "--health",
        nargs="?",
        const="",
        default=None,
        metavar="SERVICE",
        help="with --server: print the health status (of SERVICE: a model name; default the whole server) "
        "and exit 0 only when SERVING",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--token", default=None, help="bearer token (shows in the process list: prefer --token-file or CAMSERVE_TOKEN)"
    )
    p.add_argument("--token-file", default=None, help="file holding the bearer token (or env CAMSERVE_TOKEN_FILE)")
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--ca", default=None, help="PEM root certificates for --tls (default: the system's)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    p.set_defaults(func=run)


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token: --token, else --token-file, else CAMSERVE_TOKEN, else CAMSERVE_TOKEN_FILE."""
    if args.token:
        return str(args.token)
    path = args.token_file or (None if os.environ.get("CAMSERVE_TOKEN") else os.environ.get("CAMSERVE_TOKEN_FILE"))
    if path:
        return Path(path).read_text().strip() or None
    return os.environ.get("CAMSERVE_TOKEN") or None


def _table(models: list[dict[str, Any]]) -> str:
    rows = [("NAME", "VERSION", "VERSIONS", "AVAILABLE", "INPUT", "CLASSES", "REASON")]
    for m in models:
        rows.append(
            (
                m["name"],
                str(m["version"]),
                ",".join(str(v) for v in m["versions"]),
                "yes" if m["available"] else "no",
                f"{m['input_height']}x{m['input_width']}x{m['channels']}",
                str(len(m["class_names"])),
                m["reason"][:80],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _local(root: str, level: str) -> list[dict[str, Any]]:
    load_tensorflow(level)
    from camserve.serving.repository import ModelRepository

    repo = ModelRepository(root)
    repo.load()
    out = []
    for name in repo.names():
        st = repo.status(name)
        c = st.config
        out.append(
            {
                "name": name,
                "version": st.default_version or 0,
                "versions": st.versions,
                "available": st.available,
                "reason": st.reason,
                "class_names": list(c.class_names) if c else [],
                "input_height": c.input_size[0] if c else 0,
                "input_width": c.input_size[1] if c else 0,
                "channels": c.channels if c else 0,
            }
        )
    return out


def run(args: argparse.Namespace) -> int:
    if args.repository:
        models = _local(args.repository, log_level(args))
    else:
        import grpc

        from camserve.client import Client

        ca = open(args.ca, "rb").read() if args.ca else None
        token = _token(args)
        with Client(args.server, token=token, tls=args.tls, root_certificates=ca, timeout=args.timeout, retries=0) as c:
            if args.health is not None:
                try:
                    status = c.health(args.health, timeout=args.timeout)
                except grpc.RpcError as e:
                    status = f"{e.code().name}: {e.details()}"
                print(status)
                return 0 if status == "SERVING" else 1
            models = c.models()
    print(json.dumps(models, indent=2) if args.json else _table(models))
    return 0
