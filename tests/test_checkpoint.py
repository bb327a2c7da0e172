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


def names(root):
    return [folder.name for _, folder in checkpoint.checkpoints(root)]


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    w, opt = make()
    for epoch in (9, 10):  # an earlier, longer run left newer checkpoints behind
        checkpoint.save(tmp_path, epoch, {"w": w}, opt, {})
    written = checkpoint.save(tmp_path, 3, {"w": w}, opt, {}, keep=2)
    assert written.is_dir() and checkpoint.latest(tmp_path) == written
    assert names(tmp_path) == ["checkpoint-3", "checkpoint-9", "checkpoint-10"]  # newer ones are not ours to drop


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    w, opt = make()
    for epoch in (1, 2, 3):
        checkpoint.save(tmp_path, epoch, {"w": w}, opt, {}, keep=0)
    import shutil

    shutil.rmtree(tmp_path / "checkpoint-3")  # `latest` names a folder that is gone
    assert checkpoint.latest(tmp_path).name == "checkpoint-2"
    (tmp_path / "checkpoint-2" / "optimizer.pt").unlink()  # and an incomplete one is skipped
    assert checkpoint.latest(tmp_path).name == "checkpoint-1"


def test_stray_folders_are_ignored_and_keep_0_keeps_all(tmp_path):
    w, opt = make()
    (tmp_path / "checkpoint-best").mkdir(parents=True)  # a user's own folder
    (tmp_path / "notes").mkdir()
    for epoch in range(1, 5):
        checkpoint.save(tmp_path, epoch, {"w": w}, opt, {}, keep=0)
    assert names(tmp_path) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]
    checkpoint.save(tmp_path, 5, {"w": w}, opt, {}, keep=1)
    assert (tmp_path / "checkpoint-best").is_dir() and (tmp_path / "notes").is_dir()
    assert names(tmp_path) == ["checkpoint-5"]


def test_nan_weights_are_never_checkpointed(tmp_path):
    w, opt = make()
    checkpoint.save(tmp_path, 1, {"w": w}, opt, {})
    with pytest.raises(FloatingPointError, match="refusing to checkpoint epoch 2.*NaN"):
        checkpoint.save(tmp_path, 2, {"w": torch.tensor([1.0, float("nan"), 0.0])}, opt, {})
    assert checkpoint.latest(tmp_path).name == "checkpoint-1" and names(tmp_path) == ["checkpoint-1"]


def test_grad_scaler_state_round_trips(tmp_path):
    w, opt = make()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    scaler.update(new_scale=32.0)
    checkpoint.save(tmp_path, 1, {"w": w}, opt, {}, scaler=scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0)
    checkpoint.load(checkpoint.latest(tmp_path), make()[1], scaler=fresh)
    assert fresh.get_scale() == 32.0
