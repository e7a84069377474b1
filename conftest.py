"""Test session set-up, for the unit tests and for nbval's notebook runs alike.

Every notebook run by the tests uses the smoke profile on a generated tiny dataset in HAM10000's exact layout,
offline, writing to a temporary folder: the committed reports/ and the real data are never touched.
"""
import importlib
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).parent
SHARED_DATA = ROOT.parent / "shared" / "data" / "ham10000-200x150"


def pytest_configure(config):
    base = Path(tempfile.mkdtemp(prefix="skin-resnets-tests-"))
    from helpers.synthetic import make_fake_ham10000

    fake = make_fake_ham10000(base / "ham10000", lesions_per_class=24, seed=0)
    os.environ.update(HAM_PROFILE="smoke", HAM10000_DIR=str(fake), HAM_REPORTS_DIR=str(base / "reports"),
                      HAM_MODELS_DIR=str(base / "models"), HAM_CACHE_DIR=str(base / "cache"),
                      TORCH_HOME=str(base / "torch"), KAGGLEHUB_CACHE=str(base / "kagglehub"), MPLBACKEND="Agg")
    config.fake_data = fake


@pytest.fixture(scope="session")
def fake_data(pytestconfig) -> Path:
    """The generated tiny HAM10000 (read-only: tests that change data make their own copy)."""
    return pytestconfig.fake_data


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (SHARED_DATA / "HAM10000_metadata.csv").exists():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data/ham10000-200x150 beside the checkout)")
    return SHARED_DATA


@pytest.fixture
def run_main(capsys):
    """``python -m <module> args`` in this process: returncode, stdout, stderr. Each CLI's ``python -m`` form is
    tested once in a subprocess (test_predict, test_external); the other CLI cases run here, which saves importing
    torch again for every call."""
    def run(module: str, *args):
        code = importlib.import_module(module).main([str(a) for a in args])
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return run
