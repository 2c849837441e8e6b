import pytest

from tests.trainer.harness import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(corpus file, data cache folder) shared by a module's training runs (test_data.py has its own)."""
    folder = tmp_path_factory.mktemp("corpus")
    return write_corpus(folder), folder / "cache"
