"""Training data: document sources, token shards, the starter corpus, mixture sampling and packing."""

from .mixture import DomainSampler, MixtureLoader, normalize_weights, validation_batches
from .packing import IGNORE_INDEX, Packer, collate, window_example
from .shards import DocumentStore, TokenDataset, tokenize_to_shards, tokenizer_identity
from .sources import DataError, Source, SourceStats, read_documents

__all__ = [
    "DataError", "DocumentStore", "DomainSampler", "IGNORE_INDEX", "MixtureLoader", "Packer", "Source",
    "SourceStats", "TokenDataset", "collate", "normalize_weights", "read_documents", "tokenize_to_shards",
    "tokenizer_identity", "validation_batches", "window_example",
]
