"""The ``loramerge`` command line: a thin layer over the public Python API."""

from .early import install, is_cli_process

if is_cli_process():  # issue 28: before any heavy import (SIGTERM at start-up exits 143)
    install()
