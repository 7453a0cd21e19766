"""An adapter library: a SQLite catalogue of many adapters plus a faiss index of their weight signatures.

``index_sources`` builds/updates one; ``search``, ``dedupe``, ``summary`` read it; ``compose`` retrieves and
merges through the pipeline.  See docs/library.md.
"""

from .build import IndexReport, index_sources
from .query import compose, dedupe, search, search_examples, summary
from .signature import DIM, signature

__all__ = ["DIM", "IndexReport", "compose", "dedupe", "index_sources", "search", "search_examples", "signature",
           "summary"]
