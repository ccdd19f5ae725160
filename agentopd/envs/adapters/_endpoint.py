"""A minimal OpenAI-compatible chat-completions endpoint on 127.0.0.1 whose replies come from agentopd.

A foreign framework that runs its own loop (verifiers) calls ``POST <base>/chat/completions``
here. The endpoint does not generate anything: each request is handed to the adapter waiting on
its route's queue (:meth:`ChatEndpoint.next_item`), and the HTTP call blocks until the adapter
answers it with the text the student sampled in agentopd's own rollout loop
(:meth:`ChatRequest.reply`). Streaming (``"stream": true``, server-sent events) and plain JSON
replies are both served. Standard library only; bound to 127.0.0.1 on a free port.

Routes (``/r/<slot>/v1``) let several episodes share one server; a request to a route nobody waits
on is refused with HTTP 409.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REPLY_TIMEOUT_S = 3600.0
"""How long one HTTP request waits for the adapter's answer before it gets HTTP 504."""


class ChatRequest:
    """One chat-completions request, waiting for its answer."""

    def __init__(self, route: int, body: dict[str, Any]):
        self.route = route
        """The route (episode slot) it arrived on."""
        self.body = body
        """The request's JSON body, as sent."""
        self._done = threading.Event()
        self._answer: tuple[int, dict[str, Any] | None, str] = (504, None, "no answer")

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The request's ``messages`` (empty when missing or malformed)."""
        messages = self.body.get("messages")
        return messages if isinstance(messages, list) else []

    def reply(
        self,
        text: str,
        *,
        prompt_tokens: int = 0,
        token_ids: list[int] | None = None,
        logprobs: list[float] | None = None,
    ) -> None:
        """Answer with one assistant message whose content is exactly ``text``.

        ``token_ids`` and ``logprobs`` are the sampled tokens behind ``text`` and their
        log-probabilities; the completion carries them as vLLM does (``choices[0].token_ids``,
        and ``logprobs.content`` with tokens written ``token_id:<id>``, as vLLM's
        ``--return-tokens-as-token-ids`` writes them), and ``usage.completion_tokens`` counts
        them.
        """
        ids = [int(t) for t in token_ids or []]
        lps = [float(x) for x in logprobs or []]
        if lps and len(lps) != len(ids):
            raise ValueError(f"{len(ids)} token ids but {len(lps)} logprobs")
        self._answer = (
            200,
            {
                "text": text,
                "prompt_tokens": int(prompt_tokens),
                "completion_tokens": len(ids),
                "token_ids": ids,
                "logprobs": lps,
            },
            "",
        )
        self._done.set()

    def fail(self, status: int, message: str) -> None:
        """Answer with an HTTP error (the foreign loop sees a failed model call)."""
        self._answer = (int(status), None, message)
        self._done.set()

    def wait(self, timeout: float) -> tuple[int, dict[str, Any] | None, str]:
        """(HTTP status, answer or ``None``, error message), once answered or after ``timeout``."""
        if not self._done.wait(timeout):
            return 504, None, f"agentopd did not answer within {timeout:g}s"
        return self._answer


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (its episode was cancelled) is not an error worth a traceback."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class ChatEndpoint:
    """The HTTP server; one queue of :class:`ChatRequest` per open route."""

    def __init__(self, model: str = "agentopd-student"):
        self.model = model
        self._routes: dict[int, queue.Queue[Any]] = {}
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._json(
                        200, {"object": "list", "data": [{"id": endpoint.model, "object": "model"}]}
                    )
                else:
                    self._json(404, {"error": {"message": f"no such path {self.path}"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                route = endpoint._route_of(self.path)
                if route is None or not self.path.rstrip("/").endswith("/chat/completions"):
                    self._json(404, {"error": {"message": f"no such path {self.path}"}})
                    return
                try:
                    body = json.loads(raw or b"{}")
                except ValueError as e:
                    self._json(400, {"error": {"message": f"request body is not JSON: {e}"}})
                    return
                request = ChatRequest(route, body if isinstance(body, dict) else {})
                with endpoint._lock:
                    waiting = endpoint._routes.get(route)
                if waiting is None:
                    self._json(409, {"error": {"message": f"no episode waits on route {route}"}})
                    return
                waiting.put(request)
                status, answer, message = request.wait(REPLY_TIMEOUT_S)
                if answer is None:
                    self._json(status, {"error": {"message": message, "type": "agentopd"}})
                elif request.body.get("stream"):
                    self._stream(answer)
                else:
                    self._json(200, endpoint._completion(answer))

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, answer: dict[str, Any]) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                for chunk in endpoint._chunks(answer):
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="agentopd-chat-endpoint", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def base_url(self, route: int) -> str:
        """The OpenAI ``base_url`` of ``route``."""
        return f"http://127.0.0.1:{self.port}/r/{route}/v1"

    def open_route(self) -> int:
        """A free route (the lowest unused slot, so a long run reuses a few base URLs)."""
        with self._lock:
            route = 0
            while route in self._routes:
                route += 1
            self._routes[route] = queue.Queue()
            return route

    def close_route(self, route: int) -> None:
        """Stop serving ``route``; requests still queued on it get HTTP 503."""
        with self._lock:
            waiting = self._routes.pop(route, None)
        while waiting is not None and not waiting.empty():
            item = waiting.get_nowait()
            if isinstance(item, ChatRequest):
                item.fail(503, "the agentopd episode behind this route ended")

    def post(self, route: int, item: Any) -> None:
        """Queue a non-request ``item`` (the adapter's own wake-up, e.g. "episode over") on ``route``."""
        with self._lock:
            waiting = self._routes.get(route)
        if waiting is not None:
            waiting.put(item)

    def next_item(self, route: int, timeout: float) -> Any:
        """The next :class:`ChatRequest` (or posted item) on ``route``; ``None`` after ``timeout``."""
        with self._lock:
            waiting = self._routes[route]
        try:
            return waiting.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ---------------------------------------------------------------- wire format
    def _route_of(self, path: str) -> int | None:
        parts = path.split("/")
        if len(parts) > 2 and parts[1] == "r" and parts[2].isdigit():
            return int(parts[2])
        return None

    def _usage(self, answer: dict[str, Any]) -> dict[str, int]:
        p, c = answer["prompt_tokens"], answer["completion_tokens"]
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _token_fields(self, answer: dict[str, Any]) -> dict[str, Any]:
        """``token_ids`` and OpenAI-style ``logprobs`` of a choice (empty without token ids)."""
        ids = answer.get("token_ids") or []
        if not ids:
            return {}
        lps = answer.get("logprobs") or []
        content: list[dict[str, Any]] = [
            {"token": f"token_id:{t}", "logprob": lps[i] if lps else None, "bytes": None,
             "top_logprobs": []}
            for i, t in enumerate(ids)
        ]  # fmt: skip
        return {"token_ids": ids, "logprobs": {"content": content}}

    def _completion(self, answer: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": f"agentopd-{time.monotonic_ns()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer["text"]},
                    "finish_reason": "stop",
                    **self._token_fields(answer),
                }
            ],
            "usage": self._usage(answer),
        }

    def _chunks(self, answer: dict[str, Any]) -> list[dict[str, Any]]:
        head = {
            "id": f"agentopd-{time.monotonic_ns()}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model,
        }
        delta = {"role": "assistant", "content": answer["text"]}
        return [
            {
                **head,
                "choices": [
                    {
                        "index": 0,
                        "delta": delta,
                        "finish_reason": None,
                        **self._token_fields(answer),
                    }
                ],
            },
            {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {**head, "choices": [], "usage": self._usage(answer)},
        ]
