import pytest

from tests.checkpoints import make_hf_checkpoint


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    """Factory of transformers-written checkpoints shared by the whole session."""
    root = tmp_path_factory.mktemp("ckpts")

    def make(kind: str = "llama", num_layers: int = 4, seed: int = 0):
        return make_hf_checkpoint(root, kind, num_layers, seed)

    return make
