"""The retrieval engine shared by ``eval``, ``mine``, ``score`` and the LLM commands.

In data-flow order: :mod:`.corpus` (a corpus streamed from JSONL or JSONL.gz, never whole in memory), :mod:`.data`
(BEIR / FlagEmbedding layouts), :mod:`.model_folder` (what a model folder says about pooling, prompts and lengths),
:mod:`.pooling` (token states -> one vector; training uses the same function), :mod:`.encoder` (texts -> vectors),
:mod:`.store` (corpus vectors on disk in resumable shards: the embedding cache; :mod:`.cache` is its whole-array
form), :mod:`.sharded` (encoding into the store by one process or several under torchrun), :mod:`.search` (exact
search of arrays) and :mod:`.index` (the store searched exactly or through faiss IVF / HNSW). Imports nothing from
training, prep, evaluation or the round.
"""
