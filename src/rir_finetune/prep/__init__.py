"""Data preparation commands: BEIR -> training records, hard-negative mining, teacher scores, LLM answers.

One module per command (``beir``, ``mine``, ``score``, ``augment``), thin over the retrieval engine and the llm
package, sharing ``io`` (JSONL reading with file:line errors, atomic and resumable writing) and ``common`` (config
loading, summaries).
"""
