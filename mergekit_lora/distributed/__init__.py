"""Ray scale-out: module batches of one merge as Ray tasks, tune trials on Ray actors.

Ray is imported only when a Ray code path runs (``pip install -e '.[ray]'`` in the clone); everything
Ray-free (the merge core entry points) is in :mod:`.core`.
"""
