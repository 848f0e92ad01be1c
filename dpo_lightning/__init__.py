"""dpo_lightning: Direct Preference Optimization for Hugging Face causal LMs on PyTorch Lightning."""

from .data import PreferenceBatch, PreferenceCollator, PreferenceDataModule
from .losses import LOSSES, dpo_loss, preference_metrics, sequence_logps
from .module import DPOModule

__all__ = ["DPOModule", "PreferenceDataModule", "PreferenceCollator", "PreferenceBatch", "dpo_loss", "LOSSES",
           "preference_metrics", "sequence_logps"]
__version__ = "0.1.0"
