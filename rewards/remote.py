"""Remote rewards: run a heavy reward model in another process or on another host.

Server: ``diffrl rewards serve --reward pickscore --port 8765`` (or ``serve(spec)`` from Python) builds
the reward once and answers HTTP on 127.0.0.1. Client: the ``remote`` reward,
``reward={name: remote, url: http://127.0.0.1:8765}``, sends each batch there and returns the scores.

The wire protocol is JSON over HTTP, standard library only on both sides:

* ``POST /score`` with body ``{"prompts": [str], "metadata": [dict], "images": base64, "shape": [B, 3, H, W],
  "dtype": "float32" | "uint8"}``, where ``images`` is the base64 of the raw little-endian C-order array
  (float32 in [0, 1], or uint8 in [0, 255], which the server divides by 255). The answer is
  ``{"scores": [B floats], "info": {key: [B values]}, "info_dtypes": {key: "float32"}, "reward": name}``.
  Answers are strict JSON: a non-finite float in ``info`` travels as the string ``"NaN"``, ``"Infinity"`` or
  ``"-Infinity"`` (the client turns it back into a float); non-finite *scores* are an error (HTTP 500).
* ``GET /health`` answers ``{"status": "ok", "reward": name}``.
* Every error answer is JSON ``{"error": message}``: a malformed request gets a 4xx (400 bad fields or an
  incomplete body, 404/405 wrong endpoint or method, 408 no request within the read timeout, 411 no
  Content-Length, 413 body over the limit), a busy server 503 (the client retries it), an error raised by
  the reward, or non-finite scores, HTTP 500.

Limits, all arguments of ``serve``/``make_server``/``RewardServer``:

* ``max_request_mb`` (default 96): the largest request body. The server answers 413 from the
  Content-Length header alone, before reading the body; a shorter body is read in 1 MiB chunks, so a
  client that claims much and sends little costs the server no more memory than it sent.
* ``max_workers`` (default 8): connections handled at once, each by a daemon thread. Beyond that up to
  ``max_workers`` more connections get a quick 503 JSON answer (``GET /health`` is still answered) and
  any further ones are closed unanswered; the reward itself scores one batch at a time whatever this is.
* ``read_timeout`` (default 30 s): how long any single read from a client may stall; a client that sends
  its request or body slower than that (or slower than 256 KiB/s on average) gets an error answer and its
  worker is freed.

There is no authentication and no encryption: the default host 127.0.0.1 only accepts connections from
the same machine. Binding ``0.0.0.0`` (or any public address) exposes the reward, and the GPU behind it,
to everyone who can reach that port; do that only on a trusted network, or tunnel instead
(``ssh -L 8765:127.0.0.1:8765 gpu-host``).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import math
import re
import reprlib
import sys
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from rewards.base import Reward, RewardOutput, build_reward, check_finite, register

DTYPES = {"float32": np.dtype("<f4"), "uint8": np.dtype("u1")}

# The default body limit. A 512x512 RGB image is 3 MiB as float32 and so 4 MiB as base64 (1 MiB as
# uint8); the default rollout batch (sample.batch_size: 16) of them is 64 MiB of base64 plus prompts and
# metadata. 96 MiB takes that with room to spare, and 16 1024x1024 images as uint8 (64 MiB), while
# bounding what one request can make the server hold: about 3-4x its body while it is decoded (the
# bytes, the JSON string, the raw pixels, the float32 tensor), times max_workers requests at once.
# Bigger batches: send dtype uint8 (4x fewer bytes), smaller batches, or raise max_request_mb.
DEFAULT_MAX_REQUEST_MB = 96
DEFAULT_MAX_WORKERS = 8  # connections handled at once; the reward scores one batch at a time anyway
DEFAULT_READ_TIMEOUT = 30.0  # seconds any single read from a client may stall
# How a server's owner raises the body limit.
LIMIT_OPTION = "diffrl rewards serve --max-request-mb, or max_request_mb= of rewards.remote.serve()"
READ_CHUNK = 2**20  # the body is read this much at a time, never reserved up front from Content-Length
MIN_BODY_RATE = 256 * 2**10  # bytes/s: a body may take read_timeout plus 1 s per this many bytes
LINGER_SECONDS = 2.0  # after an early error answer, discard what the client still sends for this long
BUSY_READ_TIMEOUT = 2.0  # a connection turned away as busy gets this long to send its request line

_brief = reprlib.Repr()  # error messages quote the client's values, shortened
_brief.maxstring, _brief.maxother, _brief.maxlong, _brief.maxlist, _brief.maxdict = 60, 60, 40, 6, 6


# ----------------------------------------------------------------------------------------- encoding


def _jsonable(obj):
    """json.dumps fallback for metadata: numpy/torch values become lists or numbers, anything else a string."""
    if isinstance(obj, (np.ndarray, np.generic, torch.Tensor)):
        return obj.tolist()
    return str(obj)


def encode_request(images: torch.Tensor, prompts: list[str], metadata: list[dict], dtype: str = "float32") -> bytes:
    if dtype not in DTYPES:
        raise ValueError(f"remote reward dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    pixels = images.detach().float().cpu()
    if dtype == "uint8":
        pixels = (pixels.clamp(0, 1) * 255).round()
    array = np.ascontiguousarray(pixels.numpy().astype(DTYPES[dtype]))
    body = {"prompts": list(prompts), "metadata": list(metadata), "shape": list(array.shape), "dtype": dtype,
            "images": base64.b64encode(array.tobytes()).decode("ascii")}
    return json.dumps(body, default=_jsonable).encode()


def decode_request(body: bytes) -> tuple[torch.Tensor, list[str], list[dict]]:
    """The reward's arguments from a request body; ValueError says what is wrong with it."""
    try:
        request = json.loads(body)
    except UnicodeDecodeError as err:
        raise ValueError(f"body is not UTF-8 text: {err}") from None
    except RecursionError:  # json.loads recurses once per nesting level: "[[[[...]]]]" exhausts the stack
        raise ValueError("body is nested too deeply to be a /score request") from None
    except ValueError as err:  # JSONDecodeError, and integers over Python's digit limit
        raise ValueError(f"body is not JSON: {err}") from None
    if not isinstance(request, dict):
        raise ValueError('body must be a JSON object {"prompts": ..., "images": ..., "shape": ...}, '
                         f"got a JSON {_json_type(request)}")
    missing = [k for k in ("prompts", "images", "shape") if k not in request]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    prompts, shape, dtype = request["prompts"], request["shape"], request.get("dtype", "float32")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a list of strings, got {_brief.repr(prompts)}")
    if not prompts:
        raise ValueError("empty batch: prompts is [], send at least one image")
    metadata = request.get("metadata")
    if metadata is None or metadata == []:
        metadata = [{} for _ in prompts]
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise ValueError(f"metadata must be a list of objects (one per prompt), got {_brief.repr(metadata)}")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {_brief.repr(dtype)}")
    if not isinstance(shape, list) or len(shape) != 4 or not all(type(n) is int for n in shape):
        raise ValueError(f"shape must be a list of 4 integers [B, 3, H, W], got {_brief.repr(shape)}")
    if any(n < 0 for n in shape):
        raise ValueError(f"shape must not hold negative sizes, got {_brief.repr(shape)}")
    if shape[0] == 0:
        raise ValueError("empty batch: shape[0] is 0, send at least one image")
    if shape[1] != 3:
        raise ValueError(f"shape[1] (channels) must be 3 for RGB images in [B, 3, H, W] order, "
                         f"got {_brief.repr(shape[1])}")
    if shape[2] == 0 or shape[3] == 0:
        raise ValueError(f"shape[2] (height) and shape[3] (width) must be positive, got {_brief.repr(shape)}")
    if not shape[0] == len(prompts) == len(metadata):
        raise ValueError(f"batch size mismatch: shape[0]={_brief.repr(shape[0])}, {len(prompts)} prompts, "
                         f"{len(metadata)} metadata")
    if not isinstance(request["images"], str):
        raise ValueError(f"images must be a base64 string, got a JSON {_json_type(request['images'])}")
    expected = math.prod(shape) * DTYPES[dtype].itemsize  # a Python int: huge shapes do not overflow
    most = len(request["images"]) // 4 * 3  # base64 holds at most 3 bytes per 4 characters
    if expected > most:  # too short whatever it holds: no need to decode it
        raise ValueError(f"images holds at most {most} bytes, shape {_brief.repr(shape)} "
                         f"of {dtype} needs {_brief.repr(expected)}")
    try:
        raw = base64.b64decode(request["images"], validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"images is not valid base64: {err}") from None
    if len(raw) != expected:
        raise ValueError(f"images holds {len(raw)} bytes, shape {_brief.repr(shape)} of {dtype} needs {expected}")
    array = np.frombuffer(raw, dtype=DTYPES[dtype]).reshape(shape)
    if dtype == "float32" and not np.isfinite(array).all():
        raise ValueError(f"images holds {int((~np.isfinite(array)).sum())} non-finite pixel value(s) (NaN/inf); "
                         "send finite float32 pixels in [0, 1]")
    images = torch.from_numpy(array.astype(np.float32))  # a writable copy
    if dtype == "uint8":
        images = images / 255
    return images, prompts, metadata


def encode_output(out: RewardOutput, batch: int, name: str) -> dict:
    scores = torch.as_tensor(out.scores).detach()
    if scores.shape != (batch,):
        raise ValueError(f"reward {name!r} returned scores of shape {tuple(scores.shape)}, expected ({batch},)")
    scores = check_finite(scores.float().cpu(), name)  # FloatingPointError naming the reward and the count
    info, dtypes = {}, {}
    for key, value in (out.info or {}).items():
        value = torch.as_tensor(value).detach().cpu()
        info[str(key)], dtypes[str(key)] = _finite_json(value.tolist()), str(value.dtype).removeprefix("torch.")
    return {"scores": scores.tolist(), "info": info, "info_dtypes": dtypes, "reward": name}


_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _finite_json(value):
    """Nested lists of numbers with each NaN/inf float as its JSON-safe string (float() reads them back)."""
    if isinstance(value, list):
        return [_finite_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    return value


def _from_finite_json(value):
    if isinstance(value, list):
        return [_from_finite_json(v) for v in value]
    return _NONFINITE.get(value, value) if isinstance(value, str) else value


def _finite(number) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an integer beyond float range
        return False


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------------- server


class RewardServer(ThreadingHTTPServer):
    """An HTTP server around one reward object; requests are scored one batch at a time.

    At most ``max_workers`` connections are handled at once, each in a daemon thread (``workers`` is the
    semaphore they hold); while all are taken, up to ``max_workers`` more connections are answered 503 by
    short-lived threads of their own, and any beyond those are closed at once, so the server never runs more
    than ``2 * max_workers`` connection threads. Limits: see the module docstring.
    """

    daemon_threads = True
    request_queue_size = 64  # listen backlog: a burst of connections waits to be accepted (or turned away)

    def __init__(self, reward: Reward, address: tuple[str, int], max_request_mb: float = DEFAULT_MAX_REQUEST_MB,
                 *, max_workers: int = DEFAULT_MAX_WORKERS, read_timeout: float = DEFAULT_READ_TIMEOUT):
        if not max_request_mb > 0:
            raise ValueError(f"max_request_mb must be positive, got {max_request_mb!r}")
        if int(max_workers) < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers!r}")
        if not read_timeout > 0:
            raise ValueError(f"read_timeout must be positive (seconds), got {read_timeout!r}")
        self.reward = reward
        self.reward_name = getattr(reward, "name", type(reward).__name__)
        self.max_request_bytes = int(max_request_mb * 2**20)
        self.max_workers, self.read_timeout = int(max_workers), float(read_timeout)
        self.workers = threading.BoundedSemaphore(self.max_workers)  # held by each connection being handled
        self.rejecters = threading.BoundedSemaphore(self.max_workers)  # held by each connection answered 503
        self.lock = threading.Lock()  # one batch at a time: models on a GPU are not thread-safe
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def process_request(self, request, client_address):
        """Hand the connection to a daemon thread, unless max_workers are busy (then 503, or close)."""
        if self.workers.acquire(blocking=False):
            slot, handler = self.workers, self.RequestHandlerClass
        elif self.rejecters.acquire(blocking=False):
            slot, handler = self.rejecters, _BusyHandler
        else:  # flooded: answering would take a thread, and threads are what is short
            self.shutdown_request(request)
            return
        thread = threading.Thread(target=self._handle, args=(request, client_address, slot, handler),
                                  name=f"diffrl-reward-worker-{self.server_address[1]}", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # "can't start new thread"
            slot.release()
            self.shutdown_request(request)

    def _handle(self, request, client_address, slot, handler) -> None:
        try:
            handler(request, client_address, self)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            slot.release()


class _Reject(Exception):
    """An error answer to send: HTTP status and message."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class _Handler(BaseHTTPRequestHandler):
    """One request per connection (HTTP/1.0); every answer, errors included, is JSON."""

    server: RewardServer
    server_version = "diffrl-reward/1"
    busy = False  # _BusyHandler: all workers are taken; answer /health, and 503 to anything else

    def log_message(self, format, *args):  # noqa: A002 - quiet: one line per batch would flood training logs
        pass

    def setup(self):
        # The socket timeout bounds every single read and write: a stalled client cannot hold a worker.
        self.timeout = min(self.server.read_timeout, BUSY_READ_TIMEOUT) if self.busy else self.server.read_timeout
        self._replied = False
        self._unread = 0  # body bytes the client may still send after an early answer (None: unknown)
        self.requestline, self.command, self.request_version = "", "", "HTTP/1.0"  # until a request line is read
        super().setup()

    def handle_one_request(self):
        # The standard library's, except that every answer is JSON (also 408 for a request that never
        # came), and that after an early error answer the rest of the body is read and dropped for a
        # moment, so the client reads the answer instead of a connection reset.
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                return self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG, "request line over 65536 bytes")
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():  # it has answered (send_error)
                return
            self.close_connection = True
            if self.busy and not (self.command == "GET" and self._endpoint() == "/health"):
                self._unread = self._announced_length()
                return self._reply(503, {"error": f"server busy: all {self.server.max_workers} workers are taken; "
                                                  "retry shortly (the remote reward client retries 503 by itself), "
                                                  "or start the server with more max_workers"},
                                   {"Retry-After": "1"})
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self._unread = self._announced_length()
                return self._reply(405, {"error": f"method {_brief.repr(self.command)} is not allowed; "
                                                  "use GET /health or POST /score"}, {"Allow": "GET, POST"})
            method()
        except TimeoutError:
            self.close_connection = True
            self._unread = 0
            if not self._replied:
                self._reply(408, {"error": f"no complete request within the server's read timeout of "
                                           f"{self.timeout:g} s"})
        except Exception as err:  # a bug here: answer it rather than drop the connection
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            if not self._replied:
                self._reply(500, {"error": f"internal server error: {type(err).__name__}: {err}"})
        finally:
            self._discard_unread()

    def send_error(self, code, message=None, explain=None):
        """The standard library's malformed-request answers (bad request line, headers too long, ...), as JSON."""
        self.close_connection = True
        self._reply(int(code), {"error": message or self.responses.get(code, ("HTTP error",))[0]})

    def _reply(self, code: int, payload: dict, headers: dict | None = None) -> None:
        try:
            body = json.dumps(payload, allow_nan=False).encode()  # never the non-JSON tokens NaN/Infinity
        except (TypeError, ValueError) as err:
            code, body = 500, json.dumps({"error": f"the server could not encode its answer: {err}"}).encode()
        self._replied = True
        if self.request_version == "HTTP/0.9":  # no request line understood: answer with a status line anyway
            self.request_version = "HTTP/1.0"
        try:
            self.send_response(code)
            for key, value in {"Content-Type": "application/json", "Content-Length": str(len(body)),
                               "Connection": "close", **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client is gone
            self._unread = 0

    def _discard_unread(self) -> None:
        remaining, self._unread = self._unread, 0
        if remaining == 0 or not self._replied:
            return
        remaining = self.server.max_request_bytes if remaining is None else remaining
        deadline = time.monotonic() + LINGER_SECONDS
        try:
            while remaining > 0 and (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                chunk = self.rfile.read1(min(READ_CHUNK, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
        except OSError:  # timed out, reset, or a reader that already timed out
            pass

    def _endpoint(self) -> str:
        return self.path.rstrip("/")

    def _announced_length(self) -> int | None:
        """What the client says it sends, over the limit or not; None when unknown."""
        try:
            return self._content_length(limit=False)
        except _Reject:
            return None

    def _content_length(self, limit: bool = True) -> int:
        """The body's length from the Content-Length header: 411 without one, 400 if invalid, 413 if too long."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise _Reject(411, "Transfer-Encoding is not supported: send the body with a Content-Length header")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise _Reject(411, "a Content-Length header is required: POST /score takes one JSON body of known length")
        if len({v.strip() for v in values}) != 1 or not re.fullmatch(r"[0-9]{1,30}", values[0].strip()):
            raise _Reject(400, f"Content-Length must be one non-negative integer, got {_brief.repr(', '.join(values))}")
        length, most = int(values[0]), self.server.max_request_bytes
        if limit and length > most:
            raise _Reject(413, f"request body of {length} bytes is over this server's limit of {most} bytes "
                               f"({most / 2**20:g} MiB); send smaller batches, send dtype uint8 (4x fewer bytes: "
                               f"reward={{name: remote, ..., dtype: uint8}}), or raise the server's limit "
                               f"({LIMIT_OPTION})")
        return length

    def _read_body(self, length: int) -> bytearray:
        """Read the body in chunks as it arrives (never reserving ``length`` up front); 400 if it stops short."""
        body, timeout = bytearray(), self.server.read_timeout
        start = time.monotonic()
        deadline = start + timeout + length / MIN_BODY_RATE
        while len(body) < length:
            if time.monotonic() > deadline:  # checked between reads, each bounded by the socket timeout
                self._unread = length - len(body)  # answer, then drop what it still sends for a moment
                raise _Reject(400, f"request body too slow: received {len(body)} of the {length} bytes announced "
                                   f"by Content-Length in {time.monotonic() - start:.1f} s; this server allows its "
                                   f"read timeout ({timeout:g} s) plus 1 s per {MIN_BODY_RATE // 2**10} KiB")
            try:
                chunk = self.rfile.read1(min(READ_CHUNK, length - len(body)))
            except TimeoutError:
                raise _Reject(400, f"request body incomplete: received {len(body)} of the {length} bytes announced by "
                                   f"Content-Length, then nothing for {timeout:g} s (the server's read timeout); "
                                   "send the whole body, with a Content-Length that matches it") from None
            if not chunk:
                raise _Reject(400, f"request body incomplete: the connection was closed after {len(body)} of the "
                                   f"{length} bytes announced by Content-Length; send the whole body, with a "
                                   "Content-Length that matches it")
            body += chunk
        return body

    def do_GET(self):  # noqa: N802
        if self._endpoint() == "/health":
            self._reply(200, {"status": "ok", "reward": self.server.reward_name})
        else:
            self._reply(404, {"error": f"no such endpoint {_brief.repr(self.path)}; use GET /health or POST /score"})

    def do_POST(self):  # noqa: N802
        try:
            if self._endpoint() != "/score":
                self._unread = self._announced_length()
                raise _Reject(404, f"no such endpoint {_brief.repr(self.path)}; use POST /score")
            try:
                length = self._content_length()
            except _Reject:
                self._unread = self._announced_length()  # 413: the claimed length; 411, 400: unknown
                raise
            if length == 0:
                raise _Reject(400, "empty body: POST /score takes a JSON object with prompts, images and shape")
            body = self._read_body(length)
            try:
                images, prompts, metadata = decode_request(body)
            except ValueError as err:
                raise _Reject(400, f"malformed /score request: {err}") from None
            del body  # the decoded tensor is all that is needed while waiting for the reward
        except _Reject as err:
            return self._reply(err.code, {"error": str(err)})
        try:
            with self.server.lock:
                out = self.server.reward(images, prompts, metadata)
            payload = encode_output(out, len(prompts), self.server.reward_name)
        except Exception as err:  # the reward's own error (or non-finite scores): report it, keep serving
            traceback.print_exc(file=sys.stderr)
            return self._reply(500, {"error": f"{type(err).__name__}: {err}"})
        self._reply(200, payload)


class _BusyHandler(_Handler):
    busy = True


def make_server(reward_spec, host: str = "127.0.0.1", port: int = 0, max_request_mb: float = DEFAULT_MAX_REQUEST_MB,
                *, max_workers: int = DEFAULT_MAX_WORKERS, read_timeout: float = DEFAULT_READ_TIMEOUT) -> RewardServer:
    """Build the reward (a ``build_reward`` spec, or a ready Reward object) and bind, without serving yet."""
    reward = reward_spec if isinstance(reward_spec, Reward) else build_reward(reward_spec)
    return RewardServer(reward, (host, port), max_request_mb, max_workers=max_workers, read_timeout=read_timeout)


def serve(reward_spec, host: str = "127.0.0.1", port: int = 0, *, block: bool = True,
          max_request_mb: float = DEFAULT_MAX_REQUEST_MB, max_workers: int = DEFAULT_MAX_WORKERS,
          read_timeout: float = DEFAULT_READ_TIMEOUT) -> RewardServer:
    """Serve a reward over HTTP (``POST /score``, ``GET /health``; protocol in this module's docstring).

    ``reward_spec`` is anything ``build_reward`` accepts (a name, ``{name: ..., **kwargs}``, a
    ``{name: weight}`` mix) or a Reward object; the reward is built once, here. ``port=0`` picks a free
    port (see ``server.url``). The default host 127.0.0.1 accepts local connections only; binding
    ``0.0.0.0`` exposes the unauthenticated reward to the whole network.

    ``block=True`` serves until Ctrl-C; ``block=False`` serves from a daemon thread and returns the
    server at once (stop it with ``server.shutdown(); server.server_close()``).

    Limits (module docstring): ``max_request_mb`` per request body (default 96; 413 beyond), ``max_workers``
    connections at once (default 8; 503 beyond), ``read_timeout`` seconds a client may stall (default 30).
    """
    server = make_server(reward_spec, host, port, max_request_mb, max_workers=max_workers, read_timeout=read_timeout)
    if not block:
        threading.Thread(target=server.serve_forever, args=(0.05,), name="diffrl-reward-server", daemon=True).start()
        return server
    print(f"serving reward {server.reward_name!r} at {server.url} (POST /score, GET /health; requests up to "
          f"{server.max_request_bytes / 2**20:g} MiB, {server.max_workers} workers, read timeout "
          f"{server.read_timeout:g} s); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return server


# ------------------------------------------------------------------------------------------- client


@register("remote")
class RemoteReward(Reward):
    """A reward served by `diffrl rewards serve` in another process or on another host (url=)."""

    needs = "a running `diffrl rewards serve` (url=)"

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, backoff: float = 1.0,
                 dtype: str = "float32"):
        """``retries``: attempts in all on connection errors and timeouts, ``backoff * 2**k`` seconds apart.
        ``dtype="uint8"`` sends 4x fewer bytes, with pixels rounded to 1/255."""
        if "://" not in url:
            url = f"http://{url}"
        url = url.rstrip("/")
        self.url = url.removesuffix("/score").rstrip("/")
        if dtype not in DTYPES:
            raise ValueError(f"remote reward dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.timeout, self.retries, self.backoff = float(timeout), max(1, int(retries)), float(backoff)
        self.dtype = dtype
        # Connect directly: a proxy from the environment would intercept 127.0.0.1 and cluster hosts.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _request(self, path: str, body: bytes | None = None) -> dict:
        url = self.url + path
        failure = None
        for attempt in range(1, self.retries + 1):
            request = urllib.request.Request(url, data=body, method="GET" if body is None else "POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as err:
                message = _server_message(err)
                if err.code not in (502, 503, 504):  # the server answered: retrying would not help
                    raise RuntimeError(f"remote reward at {self.url} failed (HTTP {err.code}): {message}") from None
                failure = f"HTTP {err.code}: {message}"
            except urllib.error.URLError as err:
                failure = err.reason
            except (TimeoutError, ConnectionError, http.client.HTTPException) as err:
                failure = err
            if attempt < self.retries:
                time.sleep(self.backoff * 2 ** (attempt - 1))
        else:
            port = urllib.parse.urlsplit(self.url).port or "P"
            raise ConnectionError(
                f"no answer from remote reward at {self.url} after {self.retries} attempt(s) "
                f"(timeout {self.timeout:g} s each; last error: {failure}). Is the server running? Start it on "
                f"that host with `diffrl rewards serve --reward NAME --port {port}`, or fix the reward's url= "
                "(raise timeout= if batches are slow)")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RuntimeError(f"remote reward at {self.url} answered {path} with non-JSON: {raw[:200]!r}") from None

    def health(self) -> dict:
        return self._request("/health")

    def __call__(self, images, prompts, metadata):
        batch = len(images)
        if not batch == len(prompts) == len(metadata):
            raise ValueError(f"remote reward: {batch} images, {len(prompts)} prompts, {len(metadata)} metadata")
        answer = self._request("/score", encode_request(images, prompts, metadata, self.dtype))
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list) or len(scores) != batch:
            got = f"{len(scores)} scores" if isinstance(scores, list) else f"{str(answer)[:200]}"
            raise RuntimeError(f"remote reward at {self.url} returned {got} for a batch of {batch} images")
        # json.loads reads the non-standard tokens NaN and Infinity: a broken server must not slip them in.
        odd = [s for s in scores if type(s) not in (int, float)]
        if odd:
            raise RuntimeError(f"remote reward at {self.url} returned {len(odd)} non-numeric score(s), "
                               f"e.g. {_brief.repr(odd[0])}")
        bad = sum(not _finite(s) for s in scores)
        if bad:
            name = _brief.repr(answer.get("reward", "?"))
            raise FloatingPointError(
                f"remote reward at {self.url} ({name}) returned {bad} non-finite score(s) (NaN/inf) out of "
                f"{batch}; fix the served reward so that it returns finite floats")
        dtypes = answer.get("info_dtypes") or {}
        info = {}
        for key, value in (answer.get("info") or {}).items():
            dtype = getattr(torch, str(dtypes.get(key, "float32")), None)
            info[key] = torch.tensor(_from_finite_json(value),
                                     dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32)
        return RewardOutput(torch.tensor(scores, dtype=torch.float32), info)


def _server_message(err: urllib.error.HTTPError) -> str:
    try:
        raw = err.read()
    except OSError:
        raw = b""
    finally:
        err.close()
    try:
        return str(json.loads(raw)["error"])
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace")[:500] or str(err.reason)
