"""The generator layer: the answer-writing LLM learns from the retriever (Reinforced-IR's RLRF).

:mod:`.reward` samples K answers per query through the llm backends and lets a retriever folder judge them, keeping
(chosen, rejected) preference pairs; :mod:`.dpo` trains a causal LM on those pairs with TRL's ``DPOTrainer`` (LoRA)
and saves a merged model that ``augment`` loads. Same layer as training and prep: it imports the retrieval engine,
the llm layer and the top-level helpers only; the command line and the round drive it.
"""
