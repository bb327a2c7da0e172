import pytest
import torch

from finetune import checkpoint


def make():
    w = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.ones(3)
    opt.step()
    return w, opt


def test_save_load_roundtrip_and_keep(tmp_path):
    w, opt = make()
    for epoch in (1, 2, 3):
        checkpoint.save(tmp_path, epoch, {"w": w}, opt, {"tracker": {"a": [1.0]}}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    folder = checkpoint.latest(tmp_path)
    assert folder.name == "checkpoint-3"
    w2, opt2 = make()
    params, state = checkpoint.load(folder, opt2)
    assert torch.equal(params["w"], w.detach()) and state == {"tracker": {"a": [1.0]}, "epoch": 3}
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    w, opt = make()
    checkpoint.save(tmp_path, 1, {"w": w}, opt, {})

    def dies(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpoint.torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, {"w": w * 2}, opt, {})
    monkeypatch.undo()
    folder = checkpoint.latest(tmp_path)
    assert folder.name == "checkpoint-1"
    params, state = checkpoint.load(folder, make()[1])
    assert torch.equal(params["w"], w.detach()) and state["epoch"] == 1
