"""Function-preserving depth growth of the MMDiT (`launch/pretrain_shapes.py --grow-layers`)."""

import pytest
import torch

from finetune.models import tiny
from tests.helpers import load_launch_script


def test_deepen_keeps_the_function_and_trains_the_new_blocks():
    deepen = load_launch_script("pretrain_shapes.py").deepen
    torch.manual_seed(0)
    transformer = tiny.sd3_pipeline(layers=3, head_dim=8, heads=2, text_hidden=16, text_layers=1).transformer
    # Random gates everywhere, so that a wrongly zeroed or misplaced block would change the output.
    with torch.no_grad():
        for block in transformer.transformer_blocks:
            block.norm1.linear.bias.normal_()
    grown = deepen(transformer, 5)
    assert len(grown.transformer_blocks) == 5
    assert grown.transformer_blocks[-1].context_pre_only and not grown.transformer_blocks[1].context_pre_only
    x, context, pooled = torch.randn(2, 4, 16, 16), torch.randn(2, 16, 32), torch.randn(2, 32)
    t = torch.tensor([250.0, 900.0])
    with torch.no_grad():
        expected = transformer(x, context, pooled, t).sample
    out = grown(x, context, pooled, t).sample
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # The copies start closed, not frozen: their gates receive gradient.
    out.square().mean().backward()
    gate_grad = grown.transformer_blocks[1].norm1.linear.bias.grad
    assert gate_grad is not None and gate_grad.abs().sum() > 0
    with pytest.raises(ValueError, match="grow-layers"):
        deepen(transformer, 6)
