import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true", default=False,
                     help="long fuzz runs: tests/test_fuzz.py with 10,000 examples instead of 300, and "
                          "tests/test_fuzz_modes.py with 15,300 (also LORAMERGE_FUZZ_LONG=1)")


def pytest_configure(config):
    if config.getoption("--fuzz-long") or os.environ.get("LORAMERGE_FUZZ_LONG", "") not in ("", "0"):
        os.environ.setdefault("LORAMERGE_FUZZ_EXAMPLES", "10000")
        os.environ["LORAMERGE_FUZZ_LONG"] = "1"
