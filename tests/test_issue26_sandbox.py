"""Nothing leaks between pooled episodes (issue 26), on every backend.

One episode on a pooled sandbox prints a secret and creates a POSIX message queue; the sandbox
is reset and handed to the next episode, which walks ``sys._getframe()`` back as far as it goes
and scans every object the garbage collector knows for the secret, and tries to open the queue.
An executor forked from the supervisor inherited the supervisor's stack (whose frames held the
last result) and heap; a fresh one has neither. On ``local`` the queue must not reach the host.

Also: a truncation note counts the bytes that were cut, for any bytes (0x80-0xBF included).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import secrets
from collections.abc import Iterator

import pytest

from agentopd.sandbox import Limits
from agentopd.sandbox.pool import SandboxPool, close_pools
from agentopd.sandbox.testing import (
    backend_params,
    leftovers,
    process_snapshot,
    require_backend,
)

pytestmark = pytest.mark.timeout(180)

LIMITS = Limits(memory_mb=256, pids=32)
QUEUE = f"/agentopd-evil-{os.getpid()}"
MQ = """
import ctypes, ctypes.util, os
libc = ctypes.CDLL(None, use_errno=True)
try:
    mq_open = libc.mq_open
except AttributeError:
    mq_open = ctypes.CDLL(ctypes.util.find_library('rt'), use_errno=True).mq_open
mq_open.restype = ctypes.c_int
"""
FIRST = (
    MQ
    + """
fd = mq_open({queue!r}.encode(), os.O_CREAT | os.O_RDWR, 0o600, None)
print('queue', fd, os.strerror(ctypes.get_errno()) if fd < 0 else '')
print('the secret is', {prefix!r} + {token!r})
"""
)
SECOND = (
    MQ
    + """
import gc, json, sys
needle = {prefix!r} + ''.join(reversed({reversed_token!r}))
hits, frames = [], 0

seen = set()

def look(x, where, depth=0):
    if x is needle or id(x) in seen or depth > 5:
        return
    seen.add(id(x))
    if isinstance(x, (str, bytes, bytearray)):
        text = x if isinstance(x, str) else bytes(x).decode('latin-1')
        if needle in text:
            hits.append(where)
    elif isinstance(x, dict):
        for value in list(x.values()):
            look(value, where, depth + 1)
    elif isinstance(x, (list, tuple, set, frozenset)):
        for value in list(x):
            look(value, where, depth + 1)
    elif hasattr(x, '__dict__') and not isinstance(x, type(sys)):
        look(vars(x), where, depth + 1)

f = sys._getframe()
while f is not None:
    frames += 1
    look(f.f_locals, 'frame ' + f.f_code.co_name)
    f = f.f_back
for obj in gc.get_objects():
    look(obj, 'heap ' + type(obj).__name__, 4)
fd = mq_open({queue!r}.encode(), os.O_RDONLY, 0, None)
print(json.dumps({{'hits': hits, 'frames': frames, 'queue': fd >= 0}}))
"""
)


@pytest.fixture(params=backend_params())
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    require_backend(request.param)
    close_pools()
    before = process_snapshot()
    yield request.param
    close_pools()
    assert not leftovers(before)


def host_mq_open():
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        return libc.mq_open, libc.mq_unlink
    except AttributeError:
        rt = ctypes.CDLL(ctypes.util.find_library("rt"), use_errno=True)
        return rt.mq_open, rt.mq_unlink


def test_next_episode_sees_nothing_of_the_last(backend: str) -> None:
    token = secrets.token_hex(8)
    prefix = "agentopd-leak-"
    pool = SandboxPool(backend, size=1, limits=LIMITS, timeout_s=30)
    try:
        box = pool.acquire()
        first = box.run(FIRST.format(queue=QUEUE, prefix=prefix, token=token), timeout_s=30)
        assert first.ok, first.to_text()
        assert first.stdout.startswith("queue ") and not first.stdout.startswith("queue -1")
        assert prefix + token in first.stdout
        pool.release(box)
        assert pool.idle()
        again = pool.acquire()
        assert again is box and pool.stats.discarded == 0, "the reset failed"
        code = SECOND.format(queue=QUEUE, prefix=prefix, reversed_token=token[::-1])
        assert prefix + token not in code
        second = again.run(code, timeout_s=60)
        assert second.ok, second.to_text()
        seen = json.loads(second.stdout.splitlines()[-1])
        pool.release(again)
    finally:
        pool.close()
    assert seen["frames"] >= 1
    assert not seen["hits"], f"{backend}: the next episode read the last one's output"
    assert not seen["queue"], f"{backend}: the last episode's message queue survived the reset"
    if backend == "local":  # nothing on the host either, after close
        mq_open, mq_unlink = host_mq_open()
        mq_open.restype = ctypes.c_int
        fd = mq_open(QUEUE.encode(), os.O_RDONLY, 0, None)
        if fd >= 0:
            os.close(fd)
            mq_unlink(QUEUE.encode())
        assert fd < 0, "local: the sandbox's message queue is on the host after close"


def test_truncation_note_counts_cut_bytes_of_binary_output(backend: str) -> None:
    data = bytes(range(256)) * 1000  # every byte value, 0x80-0xBF included
    pool = SandboxPool(backend, size=1, limits=LIMITS, timeout_s=30)
    try:
        box = pool.acquire()
        r = box.run(
            "import sys\nsys.stdout.buffer.write(bytes(range(256)) * 1000)\nsys.stdout.flush()",
            timeout_s=30,
        )
        pool.release(box)
    finally:
        pool.close()
    kept = len(data) - r.stdout_dropped
    assert r.stdout_dropped == len(data) - LIMITS.max_output_bytes > 100_000
    cut = data[kept:].decode("utf-8", "replace")  # what the model would have been shown
    assert r.stdout_dropped_chars == len(cut)
    assert f"{len(cut)} more characters not shown" in r.to_text()
