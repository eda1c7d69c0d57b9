import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest
import torch

torch.set_num_threads(int(os.environ.get("POSTDIFF_TEST_THREADS", min(2, torch.get_num_threads()))))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")
