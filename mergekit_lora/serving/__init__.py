"""One generation core for ``loramerge generate`` and ``loramerge serve``.

- :mod:`.engine`: the base model loaded once, every adapter registered by name (PEFT adapters in one
  ``PeftModel``, switched with ``set_adapter``; each routed adapter attached with :func:`runtime.attach`
  to its own module tree that shares the base weights), prompts and the context limit.
- :mod:`.decode`: the decoding loop (a batch of left-padded rows, KV cache, greedy or sampling with
  a per-row seed, ``stop`` sequences, incremental text) — the same loop for both commands.
- :mod:`.batcher`: one worker thread, one queue per adapter, dynamic batching (rows of one adapter only).
- :mod:`.http`: the OpenAI-compatible FastAPI app (imported by ``serve`` only: fastapi is optional).
"""
