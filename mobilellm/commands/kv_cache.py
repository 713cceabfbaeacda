"""`mobilellm kv-cache`: the KV-cache size of a config at several context lengths."""

from __future__ import annotations

from ..infer.cache import cache_report
from .info import resolve_config


def kv_cache(config: str, *, tokens: list[int] | None = None) -> None:
    """Show the int8 KV-cache size, local/global layout vs all-global (the model card's figures for pro-1b).

    Args:
        config: a named config (pro-1b, tiny, ...) or a checkpoint folder
        tokens: context lengths to report (default 2000 4000 8000)
    """
    print(cache_report(resolve_config(config), tuple(tokens or (2000, 4000, 8000))))
