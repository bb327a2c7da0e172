"""Remote rewards: run a heavy reward model in another process or on another host.

Server: ``diffrl reward serve --reward pickscore --port 8765`` (or ``serve(spec)`` from Python) builds
the reward once and answers HTTP on 127.0.0.1. Client: the ``remote`` reward,
``reward={name: remote, url: http://127.0.0.1:8765}``, sends each batch there and returns the scores.

The wire protocol is JSON over HTTP, standard library only on both sides:

* ``POST /score`` with body ``{"prompts": [str], "metadata": [dict], "images": base64, "shape": [B, 3, H, W],
  "dtype": "float32" | "uint8"}``, where ``images`` is the base64 of the raw little-endian C-order array
  (float32 in [0, 1], or uint8 in [0, 255], which the server divides by 255). The answer is
  ``{"scores": [B floats], "info": {key: [B values]}, "info_dtypes": {key: "float32"}, "reward": name}``.
* ``GET /health`` answers ``{"status": "ok", "reward": name}``.
* A malformed request gets HTTP 400, an error raised by the reward HTTP 500; both carry ``{"error": message}``.

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
import sys
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from rewards.base import Reward, RewardOutput, build_reward, register

DTYPES = {"float32": np.dtype("<f4"), "uint8": np.dtype("u1")}


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
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"body is not JSON: {err}") from None
    if not isinstance(request, dict):
        raise ValueError("body must be a JSON object")
    missing = [k for k in ("prompts", "images", "shape") if k not in request]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    prompts, shape, dtype = request["prompts"], request["shape"], request.get("dtype", "float32")
    metadata = request.get("metadata") or [{} for _ in prompts]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of strings")
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise ValueError("metadata must be a list of objects")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if (not isinstance(shape, list) or len(shape) != 4
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise ValueError(f"shape must be [B, 3, H, W], got {shape!r}")
    if not shape[0] == len(prompts) == len(metadata):
        raise ValueError(f"batch size mismatch: shape[0]={shape[0]}, {len(prompts)} prompts, "
                         f"{len(metadata)} metadata")
    if not isinstance(request["images"], str):
        raise ValueError("images must be a base64 string")
    try:
        raw = base64.b64decode(request["images"], validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"images is not valid base64: {err}") from None
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if len(raw) != expected:
        raise ValueError(f"images holds {len(raw)} bytes, shape {shape} of {dtype} needs {expected}")
    array = np.frombuffer(raw, dtype=DTYPES[dtype]).reshape(shape)
    images = torch.from_numpy(array.astype(np.float32))  # a writable copy
    if dtype == "uint8":
        images = images / 255
    return images, prompts, metadata


def encode_output(out: RewardOutput, batch: int, name: str) -> dict:
    scores = torch.as_tensor(out.scores).detach()
    if scores.shape != (batch,):
        raise ValueError(f"reward {name!r} returned scores of shape {tuple(scores.shape)}, expected ({batch},)")
    info, dtypes = {}, {}
    for key, value in (out.info or {}).items():
        value = torch.as_tensor(value).detach().cpu()
        info[str(key)], dtypes[str(key)] = value.tolist(), str(value.dtype).removeprefix("torch.")
    return {"scores": scores.float().cpu().tolist(), "info": info, "info_dtypes": dtypes, "reward": name}


# ------------------------------------------------------------------------------------------- server


class RewardServer(ThreadingHTTPServer):
    """An HTTP server around one reward object; requests are scored one batch at a time."""

    def __init__(self, reward: Reward, address: tuple[str, int], max_request_mb: float = 4096):
        self.reward = reward
        self.reward_name = getattr(reward, "name", type(reward).__name__)
        self.max_request_bytes = int(max_request_mb * 2**20)
        self.lock = threading.Lock()  # one batch at a time: models on a GPU are not thread-safe
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    server_version = "diffrl-reward/1"
    timeout = 600  # seconds a connection may stall before its thread gives up

    def log_message(self, format, *args):  # noqa: A002 - quiet: one line per batch would flood training logs
        pass

    def _reply(self, code: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        if self.path.rstrip("/") == "/health":
            self._reply(200, {"status": "ok", "reward": self.server.reward_name})
        else:
            self._reply(404, {"error": f"no such endpoint {self.path!r}; use GET /health or POST /score"})

    def do_POST(self):  # noqa: N802
        if self.path.rstrip("/") != "/score":
            return self._reply(404, {"error": f"no such endpoint {self.path!r}; use POST /score"})
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._reply(411, {"error": "a Content-Length header is required"})
        if length < 0 or length > self.server.max_request_bytes:
            return self._reply(413, {"error": f"request of {length} bytes is over the server's limit of "
                                              f"{self.server.max_request_bytes}; send smaller batches or dtype uint8"})
        try:
            images, prompts, metadata = decode_request(self.rfile.read(length))
        except ValueError as err:
            return self._reply(400, {"error": f"malformed /score request: {err}"})
        try:
            with self.server.lock:
                out = self.server.reward(images, prompts, metadata)
            payload = encode_output(out, len(prompts), self.server.reward_name)
        except Exception as err:  # the reward's own error: report it to the client, keep serving
            traceback.print_exc(file=sys.stderr)
            return self._reply(500, {"error": f"{type(err).__name__}: {err}"})
        self._reply(200, payload)


def make_server(reward_spec, host: str = "127.0.0.1", port: int = 0, max_request_mb: float = 4096) -> RewardServer:
    """Build the reward (a ``build_reward`` spec, or a ready Reward object) and bind, without serving yet."""
    reward = reward_spec if isinstance(reward_spec, Reward) else build_reward(reward_spec)
    return RewardServer(reward, (host, port), max_request_mb)


def serve(reward_spec, host: str = "127.0.0.1", port: int = 0, *, block: bool = True,
          max_request_mb: float = 4096) -> RewardServer:
    """Serve a reward over HTTP (``POST /score``, ``GET /health``; protocol in this module's docstring).

    ``reward_spec`` is anything ``build_reward`` accepts (a name, ``{name: ..., **kwargs}``, a
    ``{name: weight}`` mix) or a Reward object; the reward is built once, here. ``port=0`` picks a free
    port (see ``server.url``). The default host 127.0.0.1 accepts local connections only; binding
    ``0.0.0.0`` exposes the unauthenticated reward to the whole network.

    ``block=True`` serves until Ctrl-C; ``block=False`` serves from a daemon thread and returns the
    server at once (stop it with ``server.shutdown(); server.server_close()``).
    """
    server = make_server(reward_spec, host, port, max_request_mb)
    if not block:
        threading.Thread(target=server.serve_forever, args=(0.05,), name="diffrl-reward-server", daemon=True).start()
        return server
    print(f"serving reward {server.reward_name!r} at {server.url} (POST /score, GET /health); Ctrl-C stops",
          flush=True)
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
    """A reward served by `diffrl reward serve` in another process or on another host (url=)."""

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
                f"that host with `diffrl reward serve --reward NAME --port {port}`, or fix the reward's url= "
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
        dtypes = answer.get("info_dtypes") or {}
        info = {}
        for key, value in (answer.get("info") or {}).items():
            dtype = getattr(torch, str(dtypes.get(key, "float32")), None)
            info[key] = torch.tensor(value, dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32)
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
