"""Data preparation: BEIR -> training records, hard-negative mining, teacher scores, LLM answers.

One module per command (``beir``, ``mine``, ``score``, ``augment``), sharing ``io`` (JSONL reading with file:line
errors, atomic and resumable writing) and ``common`` (config loading with positional arguments, summaries).
"""
