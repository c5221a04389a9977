"""``jlora serve``'s HTTP side: the JSON request handler over an :class:`AdapterServer`, and the command.

The endpoints and their errors are listed in :mod:`jlora.app.serve`.
"""
from __future__ import annotations

import json
import signal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from jlora.app.serve import MAX_BODY, AdapterServer, RequestError, ServeOptions

ALLOWED = {"/health": ("GET",), "/stats": ("GET",), "/adapters": ("GET", "POST"), "/generate": ("POST",)}


def allowed_methods(path: str) -> tuple[str, ...] | None:
    """The methods an endpoint takes (``DELETE`` for ``/adapters/NAME``); None: no such endpoint."""
    return ("DELETE",) if path.startswith("/adapters/") else ALLOWED.get(path)


def make_handler(server: AdapterServer) -> type[BaseHTTPRequestHandler]:
    """The request handler class over ``server`` (JSON in and out, 4xx with ``{"error": ...}``)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 60  # seconds a client may take to send its request (a short body would hang a thread)

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one line per error only
            pass

        def _reply(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if getattr(self, "command", None) != "HEAD":  # a reply to HEAD has headers only
                self.wfile.write(data)

        def handle(self) -> None:
            try:
                super().handle()
            except ConnectionError:  # the client hung up (BrokenPipe, ConnectionReset): its request is dropped
                self.close_connection = True

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """http.server's own errors as JSON too: a method without a handler (PUT, PATCH, HEAD, ...) is a
            405 naming the allowed ones (404 off the endpoints); a malformed request line or header, its 4xx."""
            headers = {"Connection": "close"}  # the rest of the request is not read
            if code == 501 and self.command:
                path = self.path.split("?", 1)[0].rstrip("/") or "/"
                allowed = allowed_methods(path)
                if allowed is None:
                    code, message = 404, f"no such endpoint {path}; try POST /generate, GET /adapters, POST /adapters"
                else:
                    code, message = 405, f"{self.command} is not allowed on {path}; allowed: {', '.join(allowed)}"
                    headers["Allow"] = ", ".join(allowed)
            self._reply(code, {"error": message or self.responses.get(code, ("error",))[0]}, headers)

        def _body(self) -> dict[str, Any]:
            if "Content-Length" not in self.headers:
                raise RequestError(411, "send the JSON body with a Content-Length header (chunked bodies are not read)")
            try:
                length = int(self.headers["Content-Length"])
            except ValueError:
                length = -1
            if length < 0:
                raise RequestError(400, f"Content-Length must be a non-negative integer, got "
                                        f"{self.headers['Content-Length']!r}")
            if length > MAX_BODY:
                raise RequestError(413, f"the request body is {length} bytes; at most {MAX_BODY}")
            try:
                raw = self.rfile.read(length)
            except TimeoutError:
                raise RequestError(408, f"the body was not received within {self.timeout} s "
                                        f"(Content-Length {length})") from None
            try:
                body = json.loads(raw or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise RequestError(400, f"the body is not valid JSON: {err}") from None
            if not isinstance(body, dict):
                raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
            return body

        def _handle(self, method: str) -> None:
            headers: dict[str, str] = {}
            try:
                status, body = self._route(method)
            except RequestError as err:
                status, body = err.status, {"error": str(err)}
                if status in (408, 411, 413):
                    self.close_connection = True  # the rest of the body is not read
                if status == 405:
                    headers["Allow"] = ", ".join(allowed_methods(self.path.split("?", 1)[0].rstrip("/")) or ())
            except ConnectionError:  # the client hung up while its body was read: nobody to answer
                raise
            except Exception as err:  # noqa: BLE001  (a server error, reported; the server keeps serving)
                status, body = 500, {"error": f"{type(err).__name__}: {err}"}
            self._reply(status, body, headers)

        def _route(self, method: str) -> tuple[int, dict[str, Any]]:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            if (method, path) == ("GET", "/health"):
                return 200, {"status": "ok"}
            if (method, path) == ("GET", "/stats"):
                return 200, {**server.stats, "compilations": server.compilations()}
            if (method, path) == ("GET", "/adapters"):
                return 200, server.describe()
            if (method, path) == ("POST", "/adapters"):
                body = self._body()
                unknown = sorted(set(body) - {"name", "path"})
                if unknown or "name" not in body or not isinstance(body.get("path"), str):
                    raise RequestError(400, f"POST /adapters takes {{\"name\": str, \"path\": str}}, got keys "
                                            f"{sorted(body)}")
                slot = server.add(body["name"], body["path"])
                return 201, {"name": body["name"], "slot": slot}
            if method == "DELETE" and path.startswith("/adapters/"):
                server.remove(path[len("/adapters/"):])
                return 200, {"deleted": path[len("/adapters/"):]}
            if (method, path) == ("POST", "/generate"):
                body = self._body()
                unknown = sorted(set(body) - {"prompt", "adapter", "max_new_tokens"})
                if unknown:
                    raise RequestError(400, f"unknown fields {unknown}; /generate takes prompt, adapter, max_new_tokens")
                future = server.submit(body.get("prompt"), body.get("adapter"), body.get("max_new_tokens"))
                tokens, text = future.result(timeout=600)
                return 200, {"completion": text, "tokens": tokens, "adapter": body.get("adapter")}
            allowed = allowed_methods(path)
            if allowed is not None:
                raise RequestError(405, f"{method} is not allowed on {path}; allowed: {', '.join(allowed)}")
            raise RequestError(404, f"no such endpoint {path}; try POST /generate, GET /adapters, POST /adapters")

        def do_GET(self) -> None:  # noqa: N802
            self._handle("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._handle("POST")

        def do_DELETE(self) -> None:  # noqa: N802
            self._handle("DELETE")

    return Handler


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the listen backlog (socketserver's default 5 resets bursts of clients)


def bind(options: ServeOptions) -> ThreadingHTTPServer:
    """The listening socket (checked before the model loads: a taken port fails at once)."""
    try:
        return _HTTPServer((options.host, options.port), BaseHTTPRequestHandler)
    except OSError as err:
        raise ValueError(f"--host {options.host} --port {options.port}: cannot listen there: {err}") from None


def start(lm: Any, options: ServeOptions, httpd: ThreadingHTTPServer | None = None
          ) -> tuple[ThreadingHTTPServer, AdapterServer]:
    """The HTTP server (not yet serving: call ``serve_forever``) and its :class:`AdapterServer`."""
    httpd = httpd or bind(options)
    try:
        state = AdapterServer(lm, options)
    except BaseException:
        httpd.server_close()
        raise
    httpd.RequestHandlerClass = make_handler(state)
    return httpd, state


def run(options: ServeOptions) -> int:
    """``jlora serve``: load the model and adapters, then serve until Ctrl-C."""
    from jlora.app.causal_lm import load_causal_lm
    httpd = bind(options)
    try:
        lm = load_causal_lm(options.model, max_positions=options.max_prompt_tokens + options.max_new_tokens,
                            dtype=options.dtype)
    except BaseException:
        httpd.server_close()
        raise
    httpd, state = start(lm, options, httpd)
    host, port = httpd.server_address[:2]
    print(f"jlora serve: {lm.source} with {len(state.names)} adapters {sorted(state.names)} "
          f"({options.slots} slots, rank <= {state.bank.rank}, {lm.dtype}) on http://{host}:{port}", flush=True)
    def stop(signum: int, frame: Any) -> None:  # SIGTERM (docker stop, systemd) ends the server like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        httpd.server_close()
        state.close()
    print("jlora serve: stopped", flush=True)
    return 0
