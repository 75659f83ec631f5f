"""Feature extractors: the contract (`features.base`), the registry and the built-ins."""

from features.base import (
    Batch,
    ComplexStft,
    Extractor,
    FrameIntermediate,
    Intermediate,
    LogMelSpectrogram,
    MelSpectrogram,
    OutputSpec,
    PowerSpectrogram,
    Stft,
)
from features.registry import available, build, build_instance, get, register_extractor

__all__ = [
    "Batch",
    "ComplexStft",
    "Extractor",
    "FrameIntermediate",
    "Intermediate",
    "LogMelSpectrogram",
    "MelSpectrogram",
    "OutputSpec",
    "PowerSpectrogram",
    "Stft",
    "available",
    "build",
    "build_instance",
    "get",
    "register_extractor",
]
