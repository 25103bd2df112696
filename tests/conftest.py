import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PIMC_SHARED", ROOT.parent / "shared"))

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=40, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def shared_dir():
    if not (SHARED / "data" / "cifar10" / "test.npz").is_file():
        pytest.skip(f"needs the shared data at {SHARED} (../shared beside the checkout, or set PIMC_SHARED): absent")
    return SHARED
