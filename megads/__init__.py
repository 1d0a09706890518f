"""megads: DeepSeek-style language-model training (MLA, DeepSeekMoE, MTP) at scale."""

__version__ = "0.1.0"
