"""model_shards: the DeepSeek-V4 model as pure torch (no ray / redis / fastapi imports).

Public names: DeepseekV4, ModelConfig, DenseModel, ExpertBank, SequenceState, StepBatch.
"""

from .batch import StepBatch
from .config import ConfigError, ModelConfig
from .dense import DenseModel, MoEWork
from .model import DeepseekV4
from .moe import ExpertBank
from .state import SequenceState, entry_rates

__all__ = ["DeepseekV4", "ModelConfig", "ConfigError", "DenseModel", "MoEWork", "ExpertBank",
           "SequenceState", "StepBatch", "entry_rates"]
