"""The retrieval engine shared by ``eval``, ``mine``, ``score`` and the LLM commands.

In data-flow order: :mod:`.data` (BEIR / FlagEmbedding layouts), :mod:`.model_folder` (what a model folder says
about pooling, prompts and lengths), :mod:`.pooling` (token states -> one vector; training uses the same function),
:mod:`.encoder` (texts -> vectors), :mod:`.cache` (corpus vectors on disk), :mod:`.search` (faiss or torch exact
search). Imports nothing from training, prep, evaluation or the round.
"""
