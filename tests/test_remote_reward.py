"""Remote rewards: the HTTP server (rewards/remote.py, `diffrl rewards serve`) and the `remote` client reward."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from rewards.base import Reward, RewardOutput, build_reward
from rewards.remote import RemoteReward, serve

ROOT = Path(__file__).resolve().parents[1]


def batch(n=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g)
    return images, [f"prompt {i}" for i in range(n)], [{"tag": i, "include": [{"class": "cat"}]} for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server_for():
    servers = []

    def start(spec):
        servers.append(serve(spec, port=0, block=False))
        return servers[-1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


class Boom(Reward):
    name = "boom"

    def __call__(self, images, prompts, metadata):
        raise RuntimeError("the reward model ran out of memory")


class Short(Reward):
    name = "short"

    def __call__(self, images, prompts, metadata):
        return RewardOutput(torch.zeros(len(images) - 1))


def test_scores_over_the_wire_equal_local_scores(server_for):
    server = server_for("brightness")
    assert server.server_address[0] == "127.0.0.1"
    client = build_reward({"name": "remote", "url": server.url, "timeout": 10})
    assert isinstance(client, RemoteReward) and client.health() == {"status": "ok", "reward": "brightness"}
    images, prompts, metadata = batch()
    local, remote = build_reward("brightness")(images, prompts, metadata), client(images, prompts, metadata)
    assert remote.scores.dtype == torch.float32 and remote.scores.shape == (4,)
    assert torch.allclose(remote.scores, local.scores, atol=1e-6)
    assert remote.info.keys() == local.info.keys()
    # uint8 on the wire: 4x smaller, pixels rounded to 1/255
    coarse = RemoteReward(server.url, dtype="uint8")(images, prompts, metadata)
    assert torch.allclose(coarse.scores, local.scores, atol=1 / 255)


def test_mix_over_the_wire(server_for):
    spec = {"brightness": 1.0, "jpeg_compressibility": 0.1}
    server = server_for(spec)
    images, prompts, metadata = batch(n=3, size=16, seed=1)
    local, remote = build_reward(spec)(images, prompts, metadata), RemoteReward(server.url)(images, prompts, metadata)
    assert torch.allclose(remote.scores, local.scores, atol=1e-5)
    assert remote.info.keys() == local.info.keys() == set(spec)
    for key in spec:
        assert torch.allclose(remote.info[key], local.info[key], atol=1e-5)


def test_dead_server_raises_after_all_retries():
    url = f"http://127.0.0.1:{free_port()}"
    client = RemoteReward(url, timeout=2, retries=3, backoff=0.01)
    start = time.monotonic()
    with pytest.raises(ConnectionError) as err:
        client(*batch())
    message = str(err.value)
    assert url in message and "3 attempt" in message and "diffrl rewards serve --reward" in message
    assert time.monotonic() - start < 5


def test_reward_error_inside_the_server_is_raised_with_its_message(server_for, capsys):
    client = RemoteReward(server_for(Boom()).url, retries=3, backoff=5)  # no retry: a backoff would be felt
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="HTTP 500.*the reward model ran out of memory"):
        client(*batch())
    assert time.monotonic() - start < 4
    assert "the reward model ran out of memory" in capsys.readouterr().err  # the server logs the traceback
    with pytest.raises(RuntimeError, match=r"HTTP 500.*returned scores of shape \(3,\), expected \(4,\)"):
        RemoteReward(server_for(Short()).url)(*batch())


def test_client_checks_the_number_of_scores(monkeypatch):
    client = RemoteReward("127.0.0.1:1")
    assert client.url == "http://127.0.0.1:1"
    monkeypatch.setattr(client, "_request", lambda path, body=None: {"scores": [1.0, 2.0, 3.0], "info": {}})
    with pytest.raises(RuntimeError, match="returned 3 scores for a batch of 4 images"):
        client(*batch())


def test_malformed_requests_get_400(server_for):
    url = server_for("brightness").url + "/score"
    for body in (b"not json", b"{}", json.dumps({"prompts": ["a"], "shape": [1, 3, 2, 2], "images": "AAAA"}).encode()):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=5)
        assert err.value.code == 400 and "malformed" in json.loads(err.value.read())["error"]
        err.value.close()


def test_cli_reward_serve():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "finetune.cli", "rewards", "serve", "--reward", "brightness",
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        client = RemoteReward(f"http://127.0.0.1:{port}", retries=1, timeout=2)
        deadline = time.monotonic() + 25
        while True:
            try:
                assert client.health()["reward"] == "brightness"
                break
            except ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"`diffrl rewards serve` did not come up: {proc.communicate(timeout=5)[0]}")
                time.sleep(0.2)
        images, prompts, metadata = batch()
        assert torch.allclose(client(images, prompts, metadata).scores, images.mean(dim=(1, 2, 3)), atol=1e-6)
    finally:
        proc.terminate()
        output = proc.communicate(timeout=10)[0]
    assert f"at http://127.0.0.1:{port}" in output


def tiny_recipe(model_dir, out, reward, epochs):
    from finetune.config import load_config

    return load_config("configs/flow_grpo_shapes_flow.yaml", [
        f"model.path={model_dir}", f"output_dir={out}", "cpu=true", f"reward={reward}", f"train.epochs={epochs}",
        "model.num_steps=2", "sample.groups_per_epoch=1", "sample.group_size=4", "sample.batch_size=4",
        "train.batch_size=4", "train.gradient_accumulation_steps=1", "eval.every=0", "log.tensorboard=false"])


def test_trainer_against_a_served_reward_then_the_server_dies(server_for, tmp_path):
    from safetensors.torch import load_file

    from finetune import checkpoint
    from finetune.trainer import Trainer
    from tests.helpers import tiny_sd3

    tiny_sd3().save_pretrained(tmp_path / "model")
    local = Trainer(tiny_recipe(tmp_path / "model", tmp_path / "local", "brightness", 2)).train()
    server = server_for("brightness")
    remote_spec = "{name: remote, url: '" + server.url + "', retries: 2, backoff: 0.01, timeout: 5}"
    remote = Trainer(tiny_recipe(tmp_path / "model", tmp_path / "remote", remote_spec, 2)).train()
    # Same rollouts, same scores over the wire: the training histories agree.
    for a, b in zip(local, remote):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)
    server.shutdown()
    server.server_close()
    latest = tmp_path / "remote" / "checkpoints" / "latest"
    saved = latest.read_text()
    with pytest.raises(ConnectionError, match="diffrl rewards serve"):
        Trainer(tiny_recipe(tmp_path / "model", tmp_path / "remote", remote_spec, 4)).train()
    # The run resumed at epoch 2, failed in epoch 3's rewards, and left epoch 2's checkpoint as the latest.
    assert latest.read_text() == saved == "checkpoint-2"
    folder = checkpoint.latest(tmp_path / "remote" / "checkpoints")
    assert json.loads((folder / "state.json").read_text())["epoch"] == 2
    assert load_file(folder / "trainable.safetensors")
