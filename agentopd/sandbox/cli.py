"""``agentopd sandbox ...``: ``build-image`` and ``check``.

The top-level CLI calls :func:`register_cli` with its argparse subparsers and dispatches with
``args.func(args)``.

* ``agentopd sandbox build-image [--force] [--image NAME]``: build the docker backend's image
  from Debian packages (skips when it exists).
* ``agentopd sandbox check``: a table of backends, whether each works here (a real start and
  ``print(1 + 1)``) and why not; exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time

from agentopd.sandbox.base import Limits, SandboxError
from agentopd.sandbox.docker_engine import DEFAULT_IMAGE
from agentopd.sandbox.factory import BACKENDS, check_backends, resolve_backend


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sandbox`` subcommand (with ``build-image`` and ``check``) to ``subparsers``."""
    p = subparsers.add_parser(
        "sandbox", help="code sandboxes: build the docker image, check backends"
    )
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])
    sub = p.add_subparsers(dest="sandbox_command", metavar="{build-image,check}")
    b = sub.add_parser(
        "build-image", help="build the docker sandbox image from Debian packages (no registry pull)"
    )
    b.add_argument("--force", action="store_true", help="rebuild even if the image exists")
    b.add_argument("--image", default=DEFAULT_IMAGE, help=f"image name (default {DEFAULT_IMAGE})")
    b.set_defaults(func=cmd_build_image)
    c = sub.add_parser(
        "check", help="report which sandbox backends work on this machine and why others do not"
    )
    c.set_defaults(func=cmd_check)


def cmd_build_image(args: argparse.Namespace) -> int:
    from agentopd.sandbox.image import build_image

    try:
        build_image(image=args.image, force=args.force)
    except SandboxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="agentopd sandbox backends (strongest first)")
    table.add_column("backend")
    table.add_column("available")
    table.add_column("reason / details", overflow="fold")
    for a in check_backends():
        details = a.details
        ok = a.available
        if ok:
            ok, details = _smoke(a.backend, details)
        table.add_row(a.backend, "[green]yes[/]" if ok else "[red]no[/]", details)
    console = Console()
    console.print(table)
    console.print(f"auto -> {resolve_backend('auto')}")
    return 0


def _smoke(backend: str, details: str) -> tuple[bool, str]:
    """Start a real sandbox and run one line; returns (works, details with the start-up time)."""
    box = BACKENDS[backend](limits=Limits(), timeout_s=10)
    t0 = time.monotonic()
    try:
        box.start()
        r = box.run("print(1 + 1)")
    except SandboxError as e:
        return False, str(e)
    finally:
        box.stop()
    if r.stdout.strip() != "2":
        return False, f"smoke test failed: {r.to_text()[:200]}"
    return True, f"{details}; start + first call {1000 * (time.monotonic() - t0):.0f} ms"


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m agentopd.sandbox.cli check``) for development."""
    parser = argparse.ArgumentParser(prog="agentopd")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sandbox", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
