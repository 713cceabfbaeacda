"""Specialist merging (MobileLLM-Pro phase 3): merge methods, streamed checkpoint merging, weight search."""

from .checkpoints import MERGE_FILE, check_inputs, load_states, merge_checkpoints, merge_states
from .methods import METHODS, MergeError, MergeMethod
from .search import SearchResult, search_weights, simplex_grid

__all__ = ["MERGE_FILE", "METHODS", "MergeError", "MergeMethod", "SearchResult", "check_inputs", "load_states",
           "merge_checkpoints", "merge_states", "search_weights", "simplex_grid"]
