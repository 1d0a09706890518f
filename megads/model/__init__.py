"""Single-device model math: MLA, DeepSeekMoE, MTP, RoPE/YaRN, the decoder and generation."""
from megads.model.cache import MLACache
from megads.model.transformer import LMOutput, Transformer

__all__ = ["Transformer", "LMOutput", "MLACache"]
