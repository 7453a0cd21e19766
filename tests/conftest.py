import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true", default=False,
                     help="run the fuzz test (tests/test_fuzz.py) with 10,000 examples instead of 300")


def pytest_configure(config):
    if config.getoption("--fuzz-long"):
        os.environ["LORAMERGE_FUZZ_EXAMPLES"] = "10000"
