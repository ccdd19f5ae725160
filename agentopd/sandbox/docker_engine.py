"""``docker`` backend: the worker as PID 1 of a hardened container (Docker Engine, ``docker`` SDK).

Hardening (all on by default): no network (``network_mode=none``), read-only root filesystem,
tmpfs ``/work`` (cwd, HOME) and ``/tmp``, memory limit without swap, CPU quota, pids limit,
file-size / open-files / core rlimits, every capability dropped, ``no-new-privileges``, uid
``65534`` (nobody), private IPC. The image is built locally from Debian packages with
``agentopd sandbox build-image`` (see ``image.py``); any image with ``/usr/bin/python3`` works.

The host talks to the worker over the container's attached stdin/stdout (``stdin_once``: when
the trainer disappears the worker sees end-of-file and exits, and ``auto_remove`` deletes the
container). Containers carry the labels ``agentopd.sandbox=1``, ``agentopd.owner=<host>:<pid>``;
the first sandbox of each process removes containers whose owner process is gone.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from typing import Any

from agentopd.sandbox.base import NOBODY, Channel, Sandbox, SandboxError

DEFAULT_IMAGE = "agentopd-sandbox:latest"
LABEL = "agentopd.sandbox"
OWNER_LABEL = "agentopd.owner"

_client_lock = threading.Lock()
_client: Any = None
_swept = False
_AVAILABLE: dict[str, tuple[bool, str]] = {}


def get_client() -> Any:
    """The process-wide Docker client (raises if the daemon cannot be reached)."""
    global _client
    with _client_lock:
        if _client is None:
            import docker

            client = docker.from_env(timeout=60)
            client.ping()
            _client = client
        return _client


def owner_id(pid: int | None = None) -> str:
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def remove_stale_containers(client: Any | None = None) -> int:
    """Remove sandbox containers whose owner process (on this host) no longer exists."""
    client = client or get_client()
    host = socket.gethostname()
    removed = 0
    for c in client.containers.list(all=True, filters={"label": LABEL}):
        owner = c.labels.get(OWNER_LABEL, "")
        owner_host, _, pid = owner.rpartition(":")
        if owner_host != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        with contextlib.suppress(Exception):
            c.remove(force=True)
            removed += 1
    return removed


def list_sandbox_containers(client: Any | None = None) -> list[Any]:
    """Every container labelled as an agentopd sandbox (for tests and ``sandbox check``)."""
    return (client or get_client()).containers.list(all=True, filters={"label": LABEL})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DockerChannel(Channel):
    """The attach socket of a container: stdin out, multiplexed stdout / stderr in."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self._err_tail = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, deadline: float) -> bytes | None:
        while True:
            out = self._demux()
            if out:
                return out
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not select.select([self.sock], [], [], left)[0]:
                return None
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return b""
            self.buf += chunk

    def _demux(self) -> bytes:
        out = bytearray()
        while len(self.buf) >= 8:
            kind, size = self.buf[0], int.from_bytes(self.buf[4:8], "big")
            if len(self.buf) < 8 + size:
                break
            payload = bytes(self.buf[8 : 8 + size])
            del self.buf[: 8 + size]
            if kind == 2:
                self._err_tail = (self._err_tail + payload)[-4096:]
            else:
                out += payload
        return bytes(out)

    def stderr_tail(self) -> str:
        return self._err_tail.decode("utf-8", "replace").strip()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class DockerSandbox(Sandbox):
    """A hardened Docker container running the worker as PID 1."""

    name = "docker"
    strength = 3

    def __init__(self, *args: Any, image: str = DEFAULT_IMAGE, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.image = image
        self._container: str | None = None

    @classmethod
    def availability(cls, image: str = DEFAULT_IMAGE) -> tuple[bool, str]:
        if image not in _AVAILABLE:
            _AVAILABLE[image] = cls._probe(image)
        return _AVAILABLE[image]

    @classmethod
    def _probe(cls, image: str) -> tuple[bool, str]:
        try:
            import docker  # noqa: F401
        except ImportError:
            return False, "the `docker` Python package is not installed (pip install docker)"
        try:
            client = get_client()
            version = client.version().get("Version", "?")
        except Exception as e:  # noqa: BLE001 - any failure means "not usable", with the reason
            return (
                False,
                f"cannot reach the Docker daemon ({type(e).__name__}: {_short(e)}); start dockerd",
            )
        try:
            img = client.images.get(image)
        except Exception:  # noqa: BLE001
            return (
                False,
                f"Docker Engine {version} is running but image {image!r} is missing; run `agentopd sandbox build-image`",
            )
        return (
            True,
            f"Docker Engine {version}, image {image} ({img.short_id.removeprefix('sha256:')})",
        )

    def worker_config(self) -> dict[str, Any]:
        return {
            "rlimits": self.limits.rlimits(nproc=False),  # the pids cgroup limits processes
            "max_output": self.limits.max_output_bytes,
            "private_pidns": True,
            "scratch": ["/work", "/tmp", "/dev/shm", "/dev/mqueue"],
            "private_ipc": True,  # ipc_mode=private
            "own_userns": False,  # Docker's seccomp profile refuses the keyring calls anyway
            "private_net": True,  # network_mode=none
        }

    def _launch(self, config: dict[str, Any]) -> Channel:
        from docker.types import Ulimit

        global _swept
        client = get_client()
        if not _swept:
            _swept = True
            remove_stale_containers(client)
        lim = self.limits
        mb = 1 << 20
        api = client.api
        try:
            host_config = api.create_host_config(
                network_mode="none",
                read_only=True,
                tmpfs={
                    "/work": f"rw,nosuid,nodev,size={lim.work_dir_mb}m,uid={NOBODY},gid={NOBODY},mode=0700",
                    "/tmp": "rw,nosuid,nodev,size=16m,mode=1777",
                },
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                ipc_mode="private",
                mem_limit=lim.memory_mb * mb,
                memswap_limit=lim.memory_mb * mb,
                nano_cpus=int(lim.cpus * 1e9),
                pids_limit=lim.pids,
                ulimits=[
                    Ulimit(name="nofile", soft=lim.open_files, hard=lim.open_files),
                    Ulimit(name="fsize", soft=lim.file_size_mb * mb, hard=lim.file_size_mb * mb),
                    Ulimit(name="core", soft=0, hard=0),
                ],
                auto_remove=True,
            )
            self._container = api.create_container(
                self.image,
                command=self.worker_argv("/usr/bin/python3", config),
                stdin_open=True,  # with detach=False this also sets StdinOnce
                tty=False,
                network_disabled=True,
                working_dir="/work",
                user=f"{NOBODY}:{NOBODY}",
                environment={
                    "HOME": "/work",
                    "TMPDIR": "/tmp",
                    "LANG": "C.UTF-8",
                    "PYTHONDONTWRITEBYTECODE": "1",
                    "MALLOC_ARENA_MAX": "2",
                },
                labels={LABEL: "1", OWNER_LABEL: owner_id()},
                host_config=host_config,
            )["Id"]
            raw = api.attach_socket(
                self._container, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
            )
            sock = getattr(raw, "_sock", raw)
            api.start(self._container)
        except Exception as e:  # noqa: BLE001 - reported with the docker error text
            raise SandboxError(f"docker: {_short(e)}") from e
        return DockerChannel(sock)

    def _crash_hint(self) -> str:
        if self._container is None:
            return ""
        try:
            state = get_client().api.inspect_container(self._container).get("State", {})
        except Exception:  # noqa: BLE001 - auto-removed already
            return ""
        if state.get("OOMKilled"):
            return f"out of memory: the {self.limits.memory_mb} MB container limit was hit"
        if state.get("Status") == "exited":
            return f"exit status {state.get('ExitCode')}"
        return ""

    def _destroy(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            with contextlib.suppress(Exception):
                get_client().api.remove_container(container, force=True)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
