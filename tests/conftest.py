import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("GNAQ_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert (DATA_DIR / "ml-100k" / "u.data").is_file(), f"datasets expected in {DATA_DIR}"
    return DATA_DIR
