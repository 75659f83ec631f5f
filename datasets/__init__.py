"""Dataset adapters: each lists audio items (stable key, URI, labels) as a Beam transform."""

from datasets.base import AudioItem, Dataset
from datasets.registry import resolve

__all__ = ["AudioItem", "Dataset", "resolve"]
