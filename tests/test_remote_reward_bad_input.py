"""The reward server (rewards/remote.py) against bad input: every malformed request gets a 4xx JSON answer,
never a dropped connection or a 500; limits (body size, workers, read timeout) hold; no NaN on the wire."""

import base64
import http.client
import http.server
import json
import math
import select
import socket
import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch

from rewards.base import Reward, RewardOutput
from rewards.remote import (DEFAULT_MAX_REQUEST_MB, DEFAULT_MAX_WORKERS, DEFAULT_READ_TIMEOUT, RemoteReward,
                            RewardServer, make_server, serve)

READ_TIMEOUT = 0.5  # the test servers' read timeout: stalled clients are answered within a second


class Mean(Reward):
    name = "mean"

    def __call__(self, images, prompts, metadata):
        scores = images.mean(dim=(1, 2, 3))
        return RewardOutput(scores, {"half": scores / 2})


class NaNScores(Reward):
    name = "nanny"

    def __call__(self, images, prompts, metadata):
        scores = images.mean(dim=(1, 2, 3))
        scores[0], scores[-1] = math.nan, math.inf
        return RewardOutput(scores)


class NaNInfo(Reward):
    name = "nan_info"

    def __call__(self, images, prompts, metadata):
        scores = images.mean(dim=(1, 2, 3))
        return RewardOutput(scores, {"ratio": torch.tensor([math.nan, math.inf, -math.inf, 1.0])[:len(images)]})


def strict_json(raw: bytes):
    """json.loads that refuses the non-standard tokens NaN, Infinity and -Infinity."""
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token} in an answer")
    return json.loads(raw, parse_constant=refuse)


@pytest.fixture
def start():
    servers = []

    def start(reward=None, **limits):
        servers.append(serve(reward or Mean(), port=0, block=False, **{"read_timeout": READ_TIMEOUT, **limits}))
        return servers[-1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def server():
    server = serve(Mean(), port=0, block=False, read_timeout=READ_TIMEOUT)
    yield server
    server.shutdown()
    server.server_close()


def exchange(server, data: bytes, *, shut: bool = False, timeout: float = 5):
    """Send raw bytes, read the answer: (status, JSON body, headers, seconds taken)."""
    begin = time.monotonic()
    with socket.create_connection(server.server_address[:2], timeout=timeout) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock)
        response.begin()
        raw = response.read()
    assert response.getheader("Content-Type") == "application/json"
    return response.status, strict_json(raw), dict(response.getheaders()), time.monotonic() - begin


def post(server, body: bytes, headers: dict | None = None, path: str = "/score", method: str = "POST", **kw):
    headers = {"Content-Length": str(len(body)), **(headers or {})}
    lines = [f"{method} {path} HTTP/1.1", "Host: test"] + [f"{k}: {v}" for k, v in headers.items() if v is not None]
    head = "".join(line + "\r\n" for line in lines)
    return exchange(server, head.encode() + b"\r\n" + body, **kw)


def b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


def request(**fields) -> bytes:
    """A valid /score body for 2 float32 4x4 images, with fields replaced (or dropped where None)."""
    body = {"prompts": ["a", "b"], "metadata": [{}, {"tag": 1}], "shape": [2, 3, 4, 4], "dtype": "float32",
            "images": b64(np.full((2, 3, 4, 4), 0.5, dtype="<f4"))}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def test_a_valid_request_is_scored(server):
    status, answer, _, _ = post(server, request())
    assert status == 200 and answer["scores"] == [0.5, 0.5] and answer["reward"] == "mean"
    status, answer, _, _ = post(server, request(dtype="uint8", images=b64(np.full((2, 3, 4, 4), 255, dtype="u1"))))
    assert status == 200 and answer["scores"] == [1.0, 1.0]


BAD_BODIES = {
    "not JSON": (b"not json", "body is not JSON"),
    "not UTF-8": (b'{"prompts": ["caf\xe9"]}', "body is not UTF-8 text"),
    "a JSON array, not an object": (b"[1, 2]", "body must be a JSON object"),
    "a JSON string, not an object": (b'"hello"', "got a JSON string"),
    "deeply nested": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "deeply nested field": (b'{"prompts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    "integer over the digit limit": (b'{"shape": [1' + b"0" * 5000 + b"]}", "body is not JSON"),
    "no fields": (b"{}", "missing field(s) prompts, images, shape"),
    "prompts not a list": (request(prompts="a b"), "prompts must be a list of strings"),
    "prompts not strings": (request(prompts=[1, 2]), "prompts must be a list of strings"),
    "no prompts": (request(prompts=[], shape=[0, 3, 4, 4]), "empty batch: prompts is []"),
    "empty shape batch": (request(shape=[0, 3, 4, 4]), "empty batch: shape[0] is 0"),
    "metadata not a list": (request(metadata={"tag": 1}), "metadata must be a list of objects"),
    "metadata entries not objects": (request(metadata=["x", 3]), "metadata must be a list of objects"),
    "metadata count": (request(metadata=[{}]), "batch size mismatch: shape[0]=2, 2 prompts, 1 metadata"),
    "unknown dtype": (request(dtype="float64"), "dtype must be one of ['float32', 'uint8']"),
    "dtype not a string": (request(dtype=["float32"]), "dtype must be one of ['float32', 'uint8']"),
    "shape not a list": (request(shape="2x3x4x4"), "shape must be a list of 4 integers [B, 3, H, W]"),
    "shape of 3": (request(shape=[2, 3, 4]), "shape must be a list of 4 integers"),
    "shape of floats": (request(shape=[2, 3, 4.0, 4]), "shape must be a list of 4 integers"),
    "shape of booleans": (request(shape=[2, 3, True, 4]), "shape must be a list of 4 integers"),
    "shape of strings": (request(shape=["2", "3", "4", "4"]), "shape must be a list of 4 integers"),
    "negative shape": (request(shape=[2, 3, -4, 4]), "shape must not hold negative sizes"),
    "4 channels": (request(shape=[2, 4, 4, 4]), "shape[1] (channels) must be 3"),
    "channels last": (request(shape=[2, 4, 4, 3]), "shape[1] (channels) must be 3"),
    "zero height": (request(shape=[2, 3, 0, 4]), "shape[2] (height) and shape[3] (width) must be positive"),
    "zero width": (request(shape=[2, 3, 4, 0]), "shape[2] (height) and shape[3] (width) must be positive"),
    "huge shape": (request(shape=[2, 3, 2**62, 2**62]), "images holds at most 384 bytes, shape"),
    "batch mismatch": (request(shape=[3, 3, 4, 4]), "batch size mismatch: shape[0]=3, 2 prompts"),
    "images not a string": (request(images=[1, 2]), "images must be a base64 string"),
    "images not base64": (request(images="!" * 512), "images is not valid base64"),
    "images of the wrong size": (request(images=b64(np.zeros(100, "<f4"))), "images holds 400 bytes, shape"),
    "NaN pixels": (request(images=b64(np.full((2, 3, 4, 4), np.nan, "<f4"))), "96 non-finite pixel value(s)"),
}


@pytest.mark.parametrize("case", BAD_BODIES)
def test_malformed_body_gets_400(server, case):
    body, phrase = BAD_BODIES[case]
    status, answer, _, _ = post(server, body)
    assert status == 400
    assert answer["error"].startswith("malformed /score request: ") and phrase in answer["error"]
    assert len(answer["error"]) < 600  # the client's values are quoted short


BAD_HEADERS = {
    "no Content-Length": ({"Content-Length": None}, 411, "a Content-Length header is required"),
    "chunked": ({"Content-Length": None, "Transfer-Encoding": "chunked"}, 411, "Transfer-Encoding is not supported"),
    "Content-Length not a number": ({"Content-Length": "lots"}, 400, "Content-Length must be one non-negative integer"),
    "negative Content-Length": ({"Content-Length": "-5"}, 400, "Content-Length must be one non-negative integer"),
    "Content-Length with underscores": ({"Content-Length": "1_0"}, 400, "must be one non-negative integer"),
    "empty body": ({"Content-Length": "0"}, 400, "empty body: POST /score takes a JSON object"),
}


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_bad_content_length(server, case):
    headers, code, phrase = BAD_HEADERS[case]
    status, answer, _, _ = post(server, b"", headers)
    assert status == code and phrase in answer["error"]


def test_conflicting_content_lengths(server):
    head = b"POST /score HTTP/1.1\r\nContent-Length: 10\r\nContent-Length: 12\r\n\r\n"
    status, answer, _, _ = exchange(server, head + b"{}")
    assert status == 400 and "Content-Length must be one non-negative integer, got '10, 12'" in answer["error"]


def test_over_the_limit_is_413_from_the_header_alone(server):
    # The client announces a terabyte and sends none of it: the answer comes at once, not after a read timeout.
    status, answer, _, _ = post(server, b"", {"Content-Length": str(10**12)})
    assert status == 413  # had the server waited for the body, it would have answered 400 after its read timeout
    message = answer["error"]
    assert f"request body of {10**12} bytes is over this server's limit of {96 * 2**20} bytes (96 MiB)" in message
    assert "smaller batches" in message and "dtype uint8" in message and "max_request_mb=" in message


def test_over_the_limit_client_gets_the_413_not_a_reset(start):
    # The remote reward client sends its whole body before it reads: the server reads and drops the rest.
    server = start(max_request_mb=1)
    images = torch.rand(4, 3, 256, 256)  # 4 MiB of base64
    with pytest.raises(RuntimeError, match=r"HTTP 413\): request body of \d+ bytes is over .* \(1 MiB\); send smaller"):
        RemoteReward(server.url, retries=1)(images, ["p"] * 4, [{}] * 4)
    assert server.max_request_bytes == 2**20


def test_body_shorter_than_its_content_length_times_out(server):
    # A client that claims 60 MiB and sends 10 bytes: the server holds no more than it got, and answers 400
    # after its read timeout.
    tracemalloc.start()
    try:
        status, answer, _, seconds = post(server, b'{"prompts"', {"Content-Length": str(60 * 2**20)})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 400 and READ_TIMEOUT <= seconds < READ_TIMEOUT + 2
    assert answer["error"] == (f"request body incomplete: received 10 of the {60 * 2**20} bytes announced by "
                               "Content-Length, then nothing for 0.5 s (the server's read timeout); send the whole "
                               "body, with a Content-Length that matches it")
    assert peak < 8 * 2**20


def test_body_cut_short_by_the_client(server):
    status, answer, _, _ = post(server, b'{"prompts"', {"Content-Length": "1000"}, shut=True)
    assert status == 400
    assert "the connection was closed after 10 of the 1000 bytes announced by Content-Length" in answer["error"]


def test_body_trickling_in_too_slowly(server):
    # Each byte comes within the read timeout, but the whole body is far below the minimum rate.
    with socket.create_connection(server.server_address[:2], timeout=5) as sock:
        sock.sendall(b"POST /score HTTP/1.1\r\nContent-Length: 1000\r\n\r\n")
        begin = time.monotonic()
        while not select.select([sock], [], [], 0.1)[0]:
            assert time.monotonic() - begin < 3, "the server kept reading a trickling body"
            sock.sendall(b" ")
        response = http.client.HTTPResponse(sock)
        response.begin()
        answer = strict_json(response.read())
    assert response.status == 400 and "request body too slow: received" in answer["error"]
    assert "read timeout (0.5 s) plus 1 s per 256 KiB" in answer["error"]


def test_no_request_at_all_gets_408(server):
    status, answer, _, seconds = exchange(server, b"")
    assert status == 408 and READ_TIMEOUT <= seconds < READ_TIMEOUT + 2
    assert answer["error"] == "no complete request within the server's read timeout of 0.5 s"
    status, answer, _, _ = exchange(server, b"POST /score HTTP/1.1\r\nContent-Le")  # stalls inside the headers
    assert status == 408


def test_broken_http_gets_json(server):
    status, answer, _, _ = exchange(server, b"GARBAGE\r\n\r\n")
    assert status == 400 and "Bad request syntax" in answer["error"]
    status, answer, _, _ = exchange(server, b"GET /" + b"x" * 70_000 + b" HTTP/1.1\r\n\r\n")
    assert status == 414 and "request line over 65536 bytes" in answer["error"]
    status, answer, _, _ = exchange(server, b"GET /health HTTP/1.1\r\nX: " + b"y" * 70_000 + b"\r\n\r\n")
    assert status == 431 and "Line too long" in answer["error"]


def test_wrong_endpoint_and_method(server):
    status, answer, _, _ = post(server, request(), path="/scores")
    assert status == 404 and "no such endpoint '/scores'; use POST /score" in answer["error"]
    status, answer, _, _ = post(server, b"", {"Content-Length": None}, path="/nope", method="GET")
    assert status == 404 and "use GET /health or POST /score" in answer["error"]
    status, answer, headers, _ = post(server, request(), method="PUT")
    assert status == 405 and answer["error"] == "method 'PUT' is not allowed; use GET /health or POST /score"
    assert headers["Allow"] == "GET, POST"


def test_defaults_and_argument_checks():
    assert 16 <= DEFAULT_MAX_REQUEST_MB <= 128 and DEFAULT_MAX_WORKERS == 8 and DEFAULT_READ_TIMEOUT == 30
    server = make_server(Mean(), port=0)
    try:
        assert server.max_request_bytes == DEFAULT_MAX_REQUEST_MB * 2**20 and server.max_workers == 8
        assert server.read_timeout == 30 and server.daemon_threads
    finally:
        server.server_close()
    for bad in ({"max_workers": 0}, {"read_timeout": 0}, {"max_request_mb": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RewardServer(Mean(), ("127.0.0.1", 0), **bad)


def settle(server):
    """Wait until the thread that answered the last 503 has ended (the client may read the answer first)."""
    assert server.rejecters.acquire(timeout=5)
    server.rejecters.release()


def test_busy_server_answers_503_and_health(start):
    server = start(max_workers=1)
    assert server.max_workers == 1
    assert server.workers.acquire(timeout=5)  # the one worker is taken
    try:
        status, answer, headers, _ = post(server, request())
        assert status == 503 and headers["Retry-After"] == "1"
        assert answer["error"].startswith("server busy: all 1 workers are taken; retry shortly")
        settle(server)
        status, answer, _, _ = post(server, b"", {"Content-Length": None}, path="/health", method="GET")
        assert status == 200 and answer == {"status": "ok", "reward": "mean"}
        settle(server)
        # 503 is worth retrying: the client raises ConnectionError (after its retries), not RuntimeError.
        with pytest.raises(ConnectionError, match="1 attempt.*last error: HTTP 503: server busy"):
            RemoteReward(server.url, retries=1)(torch.rand(2, 3, 4, 4), ["a", "b"], [{}, {}])
        # Flooded: with the 503 answerers taken as well, connections are closed unanswered (no thread spent).
        assert server.rejecters.acquire(timeout=5)
        try:
            with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
                post(server, request())
        finally:
            server.rejecters.release()
    finally:
        server.workers.release()
    assert post(server, request())[0] == 200


def test_connection_threads_are_bounded(start):
    server = start(max_workers=2)
    before = threading.active_count()
    socks = [socket.create_connection(server.server_address[:2], timeout=5) for _ in range(12)]
    try:
        time.sleep(0.2)  # each silent connection holds its thread until the read timeout
        name = f"diffrl-reward-worker-{server.server_address[1]}"
        workers = [t for t in threading.enumerate() if t.name == name]
        assert 1 <= len(workers) <= 4 and all(t.daemon for t in workers)  # 2 workers, 2 answering 503
        assert threading.active_count() - before <= 4
    finally:
        for sock in socks:
            sock.close()


def test_non_finite_scores_are_a_500_naming_the_reward(start):
    server = start(NaNScores())
    status, answer, _, _ = post(server, request())  # strict_json: no NaN token on the wire
    assert status == 500
    assert answer["error"].startswith("FloatingPointError: reward 'nanny' returned 2 non-finite score(s) (NaN/inf)")
    with pytest.raises(RuntimeError, match=r"HTTP 500\): FloatingPointError: reward 'nanny' returned 2 non-finite"):
        RemoteReward(server.url, retries=1)(torch.rand(4, 3, 4, 4), ["a"] * 4, [{}] * 4)


def test_non_finite_info_travels_as_strict_json(start):
    server = start(NaNInfo())
    status, answer, _, _ = post(server, request())
    assert status == 200 and answer["info"]["ratio"] == ["NaN", "Infinity"]
    out = RemoteReward(server.url)(torch.rand(4, 3, 4, 4), ["a"] * 4, [{}] * 4)
    ratio = out.info["ratio"]
    assert math.isnan(ratio[0]) and ratio[1] == math.inf and ratio[2] == -math.inf and ratio[3] == 1.0


class _NaNAnswer(http.server.BaseHTTPRequestHandler):
    """A broken server: its scores hold the tokens NaN and Infinity, which json.loads accepts."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b'{"scores": [NaN, 0.5, Infinity, 0.5], "info": {}, "reward": "broken"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_client_rejects_non_finite_scores(monkeypatch):
    broken = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NaNAnswer)
    threading.Thread(target=broken.serve_forever, args=(0.05,), daemon=True).start()
    try:
        client = RemoteReward(f"http://127.0.0.1:{broken.server_address[1]}", retries=1)
        with pytest.raises(FloatingPointError, match=r"\('broken'\) returned 2 non-finite score\(s\) \(NaN/inf\) out"):
            client(torch.rand(4, 3, 4, 4), ["a"] * 4, [{}] * 4)
    finally:
        broken.shutdown()
        broken.server_close()
    monkeypatch.setattr(client, "_request", lambda path, body=None: {"scores": [1.0, "2", None, True]})
    with pytest.raises(RuntimeError, match=r"returned 3 non-numeric score\(s\), e.g. '2'"):
        client(torch.rand(4, 3, 4, 4), ["a"] * 4, [{}] * 4)
    monkeypatch.setattr(client, "_request", lambda path, body=None: {"scores": [1.0, 10**400, 2, 0.5]})
    with pytest.raises(FloatingPointError, match=r"returned 1 non-finite score\(s\)"):
        client(torch.rand(4, 3, 4, 4), ["a"] * 4, [{}] * 4)


def test_cli_serve_help_states_the_servers_defaults():
    from finetune.cli import build_parser
    from rewards.remote import DEFAULT_MAX_REQUEST_MB, DEFAULT_MAX_WORKERS, DEFAULT_READ_TIMEOUT

    rewards = build_parser()._subparsers._group_actions[0].choices["rewards"]
    serve = rewards._subparsers._group_actions[0].choices["serve"]
    helps = {a.dest: a.help for a in serve._actions}
    assert f"default {DEFAULT_MAX_REQUEST_MB:g} MiB" in helps["max_request_mb"]
    assert f"default {DEFAULT_MAX_WORKERS}" in helps["workers"] and f"default {DEFAULT_READ_TIMEOUT:g}" in helps["read_timeout"]
