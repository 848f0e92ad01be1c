"""dpo_lightning: Direct Preference Optimization for Hugging Face causal LMs on PyTorch Lightning."""

from .data.collate import PreferenceBatch, PreferenceCollator
from .data.datamodule import PreferenceDataModule
from .losses import LOSSES, dpo_loss, preference_metrics, sequence_logps
from .training.module import DPOModule
from .training.settings import CompileSettings, LoraSettings, LossSettings, ReferenceSettings

__all__ = ["DPOModule", "PreferenceDataModule", "PreferenceCollator", "PreferenceBatch", "LossSettings",
           "ReferenceSettings", "LoraSettings", "CompileSettings", "dpo_loss", "LOSSES", "preference_metrics",
           "sequence_logps"]
__version__ = "0.1.0"
