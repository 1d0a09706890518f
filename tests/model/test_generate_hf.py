"""Greedy decoding: megads's absorbed-MLA KV-cached generate == transformers' generate on the
same (imported) DeepSeek-V3 weights."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from megads import hf  # noqa: E402


def test_greedy_generate_matches_transformers(tmp_path):
    config = DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, max_position_embeddings=128, initializer_range=0.15, num_nextn_predict_layers=0,
        eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    theirs = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, b in theirs.named_buffers():
            if "e_score_correction_bias" in name:
                b.uniform_(-0.2, 0.2)
    theirs.save_pretrained(tmp_path / "hf")
    ours = hf.load(tmp_path / "hf")

    prompts = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = theirs.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=8, do_sample=False,
                              eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    out = ours.generate(prompts, max_new_tokens=8, temperature=0.0)
    assert ref.sequences.shape == out.shape == (2, 20)
    # the comparison means something only if no step was a near-tie between the top two tokens
    margins = [s.topk(2, dim=-1).values.diff(dim=-1).abs().min().item() for s in ref.scores]
    assert min(margins) > 1e-3
    assert torch.equal(out, ref.sequences)
    assert torch.equal(out[:, :12], prompts)
