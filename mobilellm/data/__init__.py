"""Training data: document sources, token shards, the starter corpus, mixture sampling and packing; chat data
(SFT) and preference pairs (DPO) packed into rows; the batch sources a recipe names."""

from .batch_source import BatchLayout, BatchSource, BuiltBatches, TokenShards
from .chat_batches import ChatData
from .mixture import DomainSampler, MixtureLoader, normalize_weights, validation_batches
from .packing import IGNORE_INDEX, Packer, collate, window_example
from .pair_batches import PreferenceData
from .sharding import tokenize_to_shards
from .shards import DocumentStore, TokenDataset, tokenizer_identity
from .sources import DataError, Source, SourceStats, read_documents

__all__ = [
    "BatchLayout", "BatchSource", "BuiltBatches", "ChatData", "DataError", "DocumentStore", "DomainSampler",
    "IGNORE_INDEX", "MixtureLoader", "Packer", "PreferenceData", "Source", "SourceStats", "TokenDataset",
    "TokenShards", "collate", "normalize_weights", "read_documents", "tokenize_to_shards", "tokenizer_identity",
    "validation_batches", "window_example",
]
