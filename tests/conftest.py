import dataclasses

import pytest

from tests import interpreted
from tests.checkpoints import make_hf_checkpoint


def pytest_collection_modifyitems(items):
    interpreted.collected_files.update(str(item.path.relative_to(interpreted.ROOT)) for item in items)


@pytest.fixture
def tune():
    """tune(**fields): this process's kernel tuning (stage_worker/kernels/tuning.py) with these
    fields changed, for the test; restored after it."""
    from stage_worker.kernels import tuning

    before = tuning.active()
    yield lambda **fields: tuning.use(dataclasses.replace(before, **fields))
    tuning.use(before)


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    """Factory of transformers-written checkpoints shared by the whole session."""
    root = tmp_path_factory.mktemp("ckpts")

    def make(kind: str = "llama", num_layers: int = 4, seed: int = 0):
        return make_hf_checkpoint(root, kind, num_layers, seed)

    return make
