"""Building the ``docker`` backend's image locally from Debian packages (no registry pull).

``agentopd sandbox build-image`` runs ``debootstrap --variant=minbase --include=python3`` for
Debian bookworm into a temp dir, drops the apt caches, and imports the tree as
``agentopd-sandbox:latest`` through the Docker SDK. It needs root (debootstrap), the
``debootstrap`` package and access to a Debian mirror (``AGENTOPD_DEBIAN_MIRROR``, default
``http://deb.debian.org/debian``). It does nothing when the image already exists, unless
``force``. About one to three minutes, most of it downloading packages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable

from agentopd.sandbox.base import SandboxError
from agentopd.sandbox.docker_engine import _AVAILABLE, DEFAULT_IMAGE, get_client

DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
PACKAGES = ("python3",)


def image_exists(image: str = DEFAULT_IMAGE) -> bool:
    """Whether the Docker daemon has ``image``."""
    try:
        get_client().images.get(image)
    except Exception:  # noqa: BLE001 - docker.errors.ImageNotFound and friends
        return False
    return True


def build_image(
    image: str = DEFAULT_IMAGE,
    force: bool = False,
    mirror: str | None = None,
    echo: Callable[[str], None] = print,
) -> bool:
    """Build ``image`` with debootstrap + import. Returns ``False`` if it existed and was kept.

    Raises:
        SandboxError: Docker unreachable, not root, debootstrap missing or failing.
    """
    try:
        client = get_client()
    except Exception as e:  # noqa: BLE001
        raise SandboxError(f"cannot reach the Docker daemon ({e}); start dockerd first") from e
    if image_exists(image) and not force:
        echo(f"image {image} already exists; nothing to do (use --force to rebuild)")
        return False
    if os.geteuid() != 0:
        raise SandboxError("building the image needs root (debootstrap); run it with sudo")
    if shutil.which("debootstrap") is None:
        raise SandboxError("debootstrap not found; apt-get install debootstrap")
    mirror = mirror or os.environ.get("AGENTOPD_DEBIAN_MIRROR", DEFAULT_MIRROR)
    repository, _, tag = (
        image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "latest")
    )
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="agentopd-image-")
    try:
        root = os.path.join(tmp, "root")
        echo(f"debootstrap {SUITE} (minbase + {', '.join(PACKAGES)}) from {mirror} ...")
        cmd = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            root,
            mirror,
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-5:])
            raise SandboxError(f"debootstrap failed (exit {r.returncode}):\n{tail}")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(os.path.join(root, junk), ignore_errors=True)
        archive = os.path.join(tmp, "root.tar")
        echo("packing the root filesystem ...")
        with tarfile.open(archive, "w") as tar:
            tar.add(root, arcname=".")
        echo(f"importing as {image} ...")
        client.api.import_image_from_file(
            archive,
            repository=repository,
            tag=tag,
            changes=['LABEL agentopd.sandbox-image="1"', 'CMD ["/usr/bin/python3"]'],
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _AVAILABLE.clear()
    if not image_exists(image):
        raise SandboxError(f"import finished but image {image} is not listed by the daemon")
    echo(f"built {image} in {time.monotonic() - t0:.0f} s")
    return True
