"""launch/memory_table.py's counting, checked on tiny models against independent counts (CPU, seconds)."""

import pytest
import torch
from torch import nn

from tests.helpers import load_launch_script

mt = load_launch_script("memory_table.py")
mt.quiet_libraries()

TINY_SD3 = {
    "attention_head_dim": 8, "caption_projection_dim": 16, "dual_attention_layers": [0], "in_channels": 4,
    "joint_attention_dim": 24, "num_attention_heads": 2, "num_layers": 2, "out_channels": 4, "patch_size": 2,
    "pooled_projection_dim": 12, "pos_embed_max_size": 16, "qk_norm": "rms_norm", "sample_size": 16,
}
TINY_T5 = {"d_ff": 40, "d_kv": 8, "d_model": 16, "feed_forward_proj": "gated-gelu", "num_heads": 2,
           "num_layers": 2, "vocab_size": 100, "tie_word_embeddings": False}


@pytest.mark.parametrize("kind,config", [("sd3", TINY_SD3), ("t5", TINY_T5)])
def test_meta_parameter_counts_match_a_real_cpu_model(kind, config):
    meta = mt.count_params(mt.build_module(kind, config, device="meta", dtype=torch.bfloat16))
    real = mt.build_module(kind, config, device="cpu", dtype=torch.float32)
    assert meta["params"] == sum(p.numel() for p in real.parameters())
    assert meta["param_bytes"] == 2 * meta["params"]  # bf16
    assert meta["buffer_bytes"] == sum(b.numel() for b in real.buffers()) * 2


def test_lora_count_matches_peft_on_cpu_and_the_module_shapes():
    rank, targets = 4, mt.SD3_ATTN
    meta = mt.build_module("sd3", TINY_SD3, dtype=torch.float32)
    mt.add_lora(meta, rank, 2 * rank, targets)
    counted = mt.count_params(meta)

    real = mt.build_module("sd3", TINY_SD3, device="cpu", dtype=torch.float32)
    # independent of peft: r * (in + out) for every Linear whose name ends with ".<target>"
    by_hand = sum(rank * (m.in_features + m.out_features) for name, m in real.named_modules()
                  if isinstance(m, nn.Linear) and any(name.endswith("." + t) for t in targets))
    mt.add_lora(real, rank, 2 * rank, targets)
    assert counted["lora"] == counted["trainable"] == by_hand
    assert counted["lora"] == sum(p.numel() for n, p in real.named_parameters() if "lora_" in n and p.requires_grad)
    assert not any("attn2" in n for n, _ in meta.named_parameters() if "lora_" in n)  # official suffix match


class Block(nn.Sequential):
    def __init__(self, d, h):
        super().__init__(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d))


class Stack(nn.Module):
    """A diffusers-style model: blocks go through ``_gradient_checkpointing_func`` when it is enabled."""

    def __init__(self, k, d, h):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(k))
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = None

    def forward(self, x, return_dict=False):
        for block in self.blocks:
            x = self._gradient_checkpointing_func(block, x) if self.gradient_checkpointing else block(x)
        return (x,)


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_saved_bytes_of_a_linear_stack_by_hand(device):
    k, b, d, h = 4, 3, 8, 20
    with torch.device(device):
        model = Stack(k, d, h).to(torch.bfloat16)
        x = torch.randn(b, d, dtype=torch.bfloat16)
    # Per block autograd keeps the block input (for the first weight's gradient) and the ReLU output
    # (ReLU's backward and the second weight's gradient share it); weights are not activations.
    plain = mt.measure_saved(model, {"x": x}, checkpointing=False)
    assert plain["saved_bytes"] == k * b * (d + h) * 2
    assert plain["max_unit_bytes"] == b * (d + h) * 2
    assert plain["num_units"] == k and plain["max_unit_params"] == 2 * d * h + d + h
    # Checkpointed: only each block's input is kept; backward recomputes one block at a time.
    ckpt = mt.measure_saved(model, {"x": x}, checkpointing=True)
    assert ckpt["saved_bytes"] == k * b * d * 2
    assert model._gradient_checkpointing_func is None and not model.gradient_checkpointing  # restored


class LoraPair(nn.Module):
    """Two LoRA projections of one activation, like q and k of an attention."""

    def __init__(self, d, h, o):
        super().__init__()
        self.norm, self.lin, self.act = nn.LayerNorm(d), nn.Linear(d, h), nn.GELU()
        self.q, self.k = nn.Linear(h, o), nn.Linear(h, o)

    def forward(self, x, return_dict=False):
        g = self.act(self.lin(self.norm(x)))
        return (self.q(g) + self.k(g),)


def _lora_model(device, adapters_fp32=True, rank=4):
    from peft import LoraConfig, inject_adapter_in_model

    with torch.device(device):
        model = LoraPair(8, 24, 16)
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["q", "k"]), model)
    model.to(torch.bfloat16)
    for p in model.parameters():  # the trainer's cast_training_params: adapters in fp32
        if p.requires_grad and adapters_fp32:
            p.data = p.data.float()
    return model


def test_autocast_emulation_matches_real_autocast_on_cpu():
    """Meta + emulation saves what real (CPU) autocast saves; CPU autocast has no fp32 op list."""
    x_cpu = torch.randn(5, 7, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real = mt.measure_saved(_lora_model("cpu"), {"x": x_cpu}, checkpointing=False)
    x_meta = torch.randn(5, 7, 8, dtype=torch.bfloat16, device="meta")
    with mt.AutocastEmulation(fp32=set()):
        emulated = mt.measure_saved(_lora_model("meta"), {"x": x_meta}, checkpointing=False)
    assert emulated["saved_bytes"] == real["saved_bytes"]
    # Against a bf16 module: both lora_A layers save the shared input g there, while under autocast each
    # saves its own bf16 copy of its fp32-cast input (one more copy of g), and each lora_B keeps the bf16
    # cast of its fp32 weight for the gradient of its input.
    plain = mt.measure_saved(_lora_model("meta", adapters_fp32=False), {"x": x_meta}, checkpointing=False)
    assert real["saved_bytes"] - plain["saved_bytes"] == 5 * 7 * 24 * 2 + 2 * (16 * 4) * 2


def test_memory_row_byte_model():
    p, lora, n = 1000, 10, 8
    act = {"params": p + lora, "lora": lora, "buffer_bytes": 6, "max_unit_params": 100,
           "amp": {"no_gc": 500, "gc": 50}, "bf16": {"no_gc": 400, "gc": 40}}
    full_act = dict(act, params=p, lora=0)
    recipe = mt.Recipe("t", "t", "sd35m", train_batch=1, cfg=False, resolution=512, lora_rank=4, lora_alpha=4,
                       lora_targets=(), ema=True, old_copy=False, kl_reference=True)
    ddp = mt.memory_row("DDP", "full", recipe, 7, full_act, n)
    assert (ddp["denoiser_weights"], ddp["grads"], ddp["optimizer"]) == (2 * p + 6, 8 * p, 12 * p)
    assert ddp["extra_copies"] == 4 * p + 2 * p  # fp32 EMA + bf16 reference
    assert ddp["total_gc"] == 7 + 2 * p + 6 + 8 * p + 12 * p + 6 * p + 50
    z3 = mt.memory_row("ZeRO-3", "full", recipe, 7, full_act, n)
    assert z3["denoiser_weights"] == 2 * p / n + 6 + 200 and z3["grads"] == 2 * p / n
    assert z3["optimizer"] == 12 * p / n and z3["act_no_gc"] == 400
    z2 = mt.memory_row("ZeRO-2", "LoRA", recipe, 7, act, n)
    assert z2["optimizer"] == 12 * lora / n and z2["extra_copies"] == 2 * lora  # bf16 EMA, no reference for LoRA
