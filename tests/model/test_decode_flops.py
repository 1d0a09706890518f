"""model.info.decode_flops_per_token against the products a decode step really runs, counted by
torch's FlopCounterMode (float64, so the torch path: every product an mm/bmm it can count)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megads.config import ModelConfig
from megads.model import Transformer
from megads.model.cache import new_cache
from megads.model.info import decode_flops_per_token, flops_per_token

BASE = dict(vocab_size=57, hidden_size=24, intermediate_size=40, moe_intermediate_size=12, num_layers=3,
            first_k_dense=1, num_heads=2, q_lora_rank=10, kv_lora_rank=12, qk_nope_head_dim=6,
            qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
            max_seq_len=64, mtp_depth=1)


@pytest.mark.parametrize("kw", [{}, {"q_lora_rank": 0}, {"attention": "mha"}, {"tie_embeddings": True},
                                {"first_k_dense": 3}, {"n_shared_experts": 0, "num_experts_per_tok": 3}],
                         ids=["mla", "mla_no_q_lora", "mha", "tied", "dense", "no_shared_top3"])
@pytest.mark.parametrize("prompt", [1, 9])
def test_decode_flops_equal_the_counted_products(kw, prompt):
    cfg = ModelConfig(**{**BASE, **kw})
    cfg.validate()
    torch.manual_seed(0)
    model = Transformer(cfg).double().eval()
    B = 3
    tokens = torch.randint(0, cfg.vocab_size, (B, prompt + 1))
    with torch.no_grad():
        cache = new_cache(cfg, B, 16, dtype=torch.float64)
        model(tokens[:, :prompt], cache=cache)
        with FlopCounterMode(display=False) as counter:
            model(tokens[:, prompt:], cache=cache)
    assert counter.get_total_flops() == B * decode_flops_per_token(cfg, prompt + 1)


def test_tied_head_counts_in_training_flops():
    # with tied embeddings the one matrix is the head's: its product costs what an untied head's does
    untied = ModelConfig(**BASE)
    tied = ModelConfig(**{**BASE, "tie_embeddings": True})
    assert flops_per_token(tied, 32) == flops_per_token(untied, 32)
    assert decode_flops_per_token(tied, 5) == decode_flops_per_token(untied, 5)
