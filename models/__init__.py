"""Model definitions: the frozen LM (loading, hooks, lens), and later the decoders and the RLModule.

`models/` imports no other faithlens package; everything else builds on it.
"""

from models.config import ModelConfig
from models.errors import ConfigError
from models.frozen import FrozenLM
from models.loading import EMBEDDED_MODELS, load_frozen

__all__ = ["EMBEDDED_MODELS", "ConfigError", "FrozenLM", "ModelConfig", "load_frozen"]
