"""HTTP teacher (``teacher_backend=server``): prefill scoring on a vLLM OpenAI-compatible server.

Each segment is one ``POST {url}/v1/completions`` with the student's exact token ids as the
prompt (a list of ints, never text), ``max_tokens=1`` and ``prompt_logprobs=k``; the reply's
per-position log-probs become :class:`~agentopd.types.TeacherScores`
(:func:`agentopd.teachers.prefill.from_prompt_logprobs`; entropy is the top-k plus tail-bucket
estimate). Start a server with, e.g.::

    vllm serve Qwen/Qwen3-8B --max-logprobs 16      # vLLM's default limit is 20

and train with ``teacher_backend=server teacher_cfg.server.url=http://HOST:8000``.

Start-up checks (they fail at compose time, before a run directory exists): the server answers
and serves the model, its tokenizer maps a probe text to the student's ids (``/tokenize``), and
one scoring request at ``teacher_cfg.topk`` succeeds, so a top-k above the server's
``--max-logprobs`` is named as such. At run time a request that fails with a connection error,
a timeout, 429 or a 5xx is retried ``retries`` times with exponential backoff; after that the
step stops with :class:`TeacherServerError` (resume the run with ``resume=true`` once the server
is back). ``timeout_s`` bounds each request as a whole (connecting, sending, the headers and
the whole body), so a server that drips its reply a byte at a time is cut off like a silent one.
A reply that cannot be used (too few top-k entries, a wrong number of positions, a NaN or
infinite score) is a :class:`TeacherServerError` naming the server and the episode; scores pass
through :func:`agentopd.teachers.check_scores` before they reach a batch. ``concurrency`` requests are in flight at once. The API key, if any, is read from the
environment variable named by ``api_key_env`` and sent as a bearer token.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
from typing import Any

from agentopd.renderer import Renderer
from agentopd.schema import ConfigError
from agentopd.teachers import (
    ServerConfig,
    TeacherConfig,
    TokenizerMismatchError,
    UnusableScoresError,
    check_scores,
    prefill,
)
from agentopd.types import Episode, TeacherScores

PROBE_TEXT = "The teacher scores the student's token ids: 0123 <tool_call>{}</tool_call>"
"""Tokenized by both sides at start-up to check that they agree."""


class TeacherServerError(RuntimeError):
    """The scoring server failed (after retries) or answered something unusable."""


class _HTTPError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status, self.body = status, body


class Client:
    """A small JSON-over-HTTP client with timeouts, retries with backoff and an API key.

    Args:
        config: The ``teacher_cfg.server`` settings (``url`` must be set).
    """

    def __init__(self, config: ServerConfig):
        if not config.url:
            raise ConfigError(
                "teacher_backend=server needs teacher_cfg.server.url, e.g. "
                "teacher_cfg.server.url=http://127.0.0.1:8000 (a `vllm serve` endpoint)"
            )
        self.config = config
        self.base = config.url.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[: -len("/v1")]
        key = os.environ.get(config.api_key_env)
        self._headers = {"Content-Type": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"

    def _once(self, path: str, payload: dict[str, Any] | None) -> Any:
        """One request, bounded as a whole by ``timeout_s``: a watchdog shuts the socket at the
        deadline, whatever state the exchange is in (a slow drip of bytes included)."""
        data = None if payload is None else json.dumps(payload).encode()
        url = urllib.parse.urlsplit(self.base + path)
        cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        timeout = self.config.timeout_s
        conn = cls(url.netloc, timeout=timeout)
        expired = threading.Event()
        sockets: list[socket.socket] = []

        def cut() -> None:
            expired.set()
            for sock in sockets:  # the connection hands its socket to the response: keep it
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(timeout, cut)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.connect()
            if conn.sock is not None:
                sockets.append(conn.sock)
            if expired.is_set():
                cut()
            target = url.path + (f"?{url.query}" if url.query else "")
            conn.request("GET" if data is None else "POST", target, data, self._headers)
            resp = conn.getresponse()
            body = resp.read()
            if expired.is_set():
                raise TimeoutError
            if resp.status >= 400:
                raise _HTTPError(resp.status, body.decode(errors="replace"))
            # NaN / Infinity (bare constants, as vLLM may write them) parse to floats here and
            # are refused by check_scores, which can name the episode.
            return json.loads(body.decode())
        except (OSError, http.client.HTTPException) as e:
            if expired.is_set():
                raise TimeoutError(f"no complete reply within timeout_s={timeout:g} s") from None
            raise ConnectionError(f"{type(e).__name__}: {e}") from None
        finally:
            watchdog.cancel()
            conn.close()

    def request(
        self, path: str, payload: dict[str, Any] | None = None, retries: int | None = None
    ) -> Any:
        """GET (no payload) or POST JSON to ``path``; retries transient failures.

        Raises:
            TeacherServerError: A non-retryable HTTP error, or the last failure after retries.
        """
        retries = self.config.retries if retries is None else retries
        delay = self.config.backoff_s
        for attempt in range(retries + 1):
            try:
                return self._once(path, payload)
            except _HTTPError as e:
                if e.status != 429 and e.status < 500:
                    raise TeacherServerError(f"{self.base}{path}: {e}") from None
                why = str(e)
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                why = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except ValueError as e:  # not JSON, or NaN / Infinity written as bare constants
                raise TeacherServerError(
                    f"teacher server {self.base}{path} sent an unusable reply: {e}"
                ) from None
            if attempt < retries:
                time.sleep(delay)
                delay *= 2
        raise TeacherServerError(
            f"teacher server {self.base} failed {retries + 1} times on {path} (last: {why}). "
            "Check that the server is up; then continue the run with resume=true."
        )


def build(name: str, *, tokenizer: Any, config: TeacherConfig, device: Any) -> ServerTeacher:
    """The ``server`` :class:`~agentopd.teachers.TeacherFactory`: connect and check (see the
    module docstring). ``name`` (the ``teacher=`` key) selects the served model when the server
    serves it; ``teacher_cfg.server.model`` overrides it."""
    client = Client(config.server)
    try:
        served = [m["id"] for m in client.request("/v1/models", retries=0)["data"]]
    except TeacherServerError as e:
        raise ConfigError(
            f"teacher_cfg.server.url={config.server.url}: the teacher server is not reachable ({e})"
        ) from None
    model = config.server.model or (name if name in served else None)
    if model is None and len(served) == 1:
        model = served[0]
    if model is None or model not in served:
        raise ConfigError(
            f"teacher server {client.base} serves {served}; set teacher_cfg.server.model to one "
            "of them"
        )
    teacher = ServerTeacher(client, model, Renderer(tokenizer), config)
    teacher.check_tokenizer(tokenizer)
    teacher.check_topk()
    return teacher


class ServerTeacher:
    """Scores episodes over HTTP; see the module docstring.

    Args:
        client: The HTTP client.
        model: Served model name.
        renderer: A renderer over the (shared) tokenizer, for re-rendered teacher prompts.
        config: Scoring options.
    """

    def __init__(self, client: Client, model: str, renderer: Renderer, config: TeacherConfig):
        self.client, self.model, self.renderer, self.config = client, model, renderer, config

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise :class:`TokenizerMismatchError` if the server tokenizes a probe differently."""
        try:
            got = self.client.request(
                "/tokenize",
                {"model": self.model, "prompt": PROBE_TEXT, "add_special_tokens": False},
                retries=0,
            )["tokens"]
        except TeacherServerError as e:
            if "404" in str(e):
                return  # not a vLLM server: no /tokenize to check against
            raise ConfigError(f"teacher server tokenizer check failed: {e}") from None
        want = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
        if list(got) != list(want):
            raise TokenizerMismatchError(
                f"the teacher server's tokenizer differs from the student's: {PROBE_TEXT!r} -> "
                f"{got[:12]}... there, {want[:12]}... here. Serve a teacher with the student's "
                "tokenizer."
            )

    def check_topk(self) -> None:
        """Score a two-token prompt at ``topk``; a top-k above ``--max-logprobs`` says so."""
        try:
            self._prompt_logprobs([0, 0])
        except TeacherServerError as e:
            if "logprobs" in str(e).lower():
                raise ConfigError(
                    f"teacher_cfg.topk={self.config.topk} is more than the teacher server allows: "
                    f"start it with --max-logprobs {self.config.topk} or more (vLLM's default is "
                    f"20), or lower teacher_cfg.topk. Server said: {e}"
                ) from None
            raise ConfigError(f"teacher server {self.client.base} cannot score: {e}") from None

    def _prompt_logprobs(self, tokens: list[int]) -> list[dict[int, tuple[float, int]] | None]:
        reply = self.client.request(
            "/v1/completions",
            {
                "model": self.model,
                "prompt": tokens,
                "max_tokens": 1,
                "temperature": 0.0,
                "prompt_logprobs": self.config.topk,
            },
        )
        try:
            rows = reply["choices"][0]["prompt_logprobs"]
            return [
                None
                if row is None
                else {int(t): (float(v["logprob"]), int(v["rank"])) for t, v in row.items()}
                for row in rows
            ]
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise TeacherServerError(
                f"teacher server {self.client.base} reply has no usable prompt_logprobs "
                f"({type(e).__name__}: {e}); is it a vLLM server?"
            ) from None

    def score(self, episodes: list[Episode]) -> list[list[TeacherScores]]:
        """Score every segment; sets ``episode.teacher`` and returns the scores per episode."""
        slots = prefill.empty_slots(episodes)
        reqs = prefill.requests(episodes, self.renderer, self.config)
        workers = max(1, min(self.config.server.concurrency, len(reqs)))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            rows = list(pool.map(lambda r: self._prompt_logprobs(r.tokens), reqs))
        k = self.config.topk
        for req, r in zip(reqs, rows, strict=True):
            try:
                scores = prefill.from_prompt_logprobs(req, r, k)
            except ValueError as e:
                ep = episodes[req.episode]
                raise TeacherServerError(
                    f"teacher server {self.client.base} ({self.model}) answered unusable scores "
                    f"for episode {req.episode} of the batch (env {ep.env}, task "
                    f"{ep.task_id!r}, seed {ep.seed}), segment {req.segment}: {e}"
                ) from None
            slots[req.episode][req.segment] = scores
        try:
            check_scores(episodes, f"server {self.client.base} ({self.model})", k)
        except UnusableScoresError as e:
            raise TeacherServerError(str(e)) from None
        return prefill.filled(slots)
