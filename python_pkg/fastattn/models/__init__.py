"""fastattn.models: a small transformer (GPT, BERT-style encoder, encoder-decoder) whose
every attention call goes through fastattn, plus its data, trainer and generator.

    from fastattn.models import ModelConfig, Transformer
    model = Transformer(ModelConfig(kind="gpt", patterns=("window:128", "bigbird")))
"""

from .model import KVCache, ModelConfig, Transformer, build_model, sample

__all__ = ["ModelConfig", "Transformer", "KVCache", "build_model", "sample"]
