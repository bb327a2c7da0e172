"""CUDA-safe noise and precision, checked on the CPU.

On CUDA, ``torch.randn(..., generator=cpu_generator, device="cuda")`` raises; diffusers draws on the
generator's device and moves the tensor (``randn_tensor``). A strict stand-in for ``torch.randn``
raises the same way for any device pair, so the sampler steps are run on the ``meta`` device with a
CPU generator.
"""

import re
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from finetune.models.flow import cps_step_with_logprob, sde_step_with_logprob
from finetune.models.sd import ddim_step_with_logprob

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def strict_randn(monkeypatch):
    original = torch.randn

    def randn(*args, generator=None, device=None, **kwargs):
        if generator is not None and torch.device(device or "cpu").type != generator.device.type:
            raise RuntimeError(f"Expected a '{torch.device(device).type}' device type for generator but found "
                               f"'{generator.device.type}'")
        return original(*args, generator=generator, device=device, **kwargs)

    monkeypatch.setattr(torch, "randn", randn)


def schedulers():
    ddim = DDIMScheduler(num_train_timesteps=1000)
    ddim.set_timesteps(10)
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow.set_timesteps(10)
    return ddim, flow


@pytest.mark.parametrize("kind", ["ddim", "sde", "cps"])
def test_sampler_steps_draw_noise_on_the_generator_device(strict_randn, kind):
    ddim, flow = schedulers()
    step, scheduler, t = {"ddim": (ddim_step_with_logprob, ddim, ddim.timesteps[3]),
                          "sde": (sde_step_with_logprob, flow, flow.timesteps[3]),
                          "cps": (cps_step_with_logprob, flow, flow.timesteps[3])}[kind]
    x = torch.randn(2, 4, 8, 8, device="meta")
    out = step(scheduler, torch.randn(2, 4, 8, 8, device="meta"), t, x, 0.7, generator=torch.Generator())
    assert out[0].device.type == "meta"
    # On the CPU the draw is the generator's plain randn stream: seeded runs are unchanged, so two
    # seeds' samples differ by std * (their randn streams' difference), with one std per sample.
    g = torch.Generator().manual_seed(0)  # seeded: the tolerance below holds for these inputs
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    prev = [step(scheduler, v, t, x, 0.7, generator=torch.Generator().manual_seed(s))[0] for s in (5, 6)]
    streams = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (5, 6)]
    ratio = (prev[0] - prev[1]) / (streams[0] - streams[1])
    torch.testing.assert_close(ratio, ratio[:, :1, :1, :1].expand_as(ratio), rtol=1e-4, atol=1e-6)
    assert (ratio > 0).all()


def test_initial_noise_is_drawn_per_seed_on_the_cpu_and_moved(strict_randn):
    from eval.generate import initial_noise
    from tests.helpers import tiny_sd

    pipe = tiny_sd()
    noise = initial_noise(pipe, [3, 4], device="meta")
    assert noise.device.type == "meta" and noise.shape[0] == 2
    cpu = initial_noise(pipe, [3, 4])
    assert torch.equal(cpu[1], torch.randn(cpu.shape[1:], generator=torch.Generator().manual_seed(4)))


def test_one_noise_helper_everywhere():
    """No package code calls torch.randn itself: noise goes through diffusers' randn_tensor."""
    offenders = [f"{path.relative_to(ROOT)}:{i}" for folder in ("finetune", "eval", "rewards")
                 for path in (ROOT / folder).rglob("*.py")
                 for i, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"\btorch\.randn\(", line)]
    assert not offenders, offenders
