"""The one file the ``gguf`` output format writes (torch-free: the registry names it without loading gguf.py)."""

GGUF_NAME = "adapter.gguf"
