"""rir-finetune: fine-tune bi-encoder retrievers with the Reinforced-IR objective."""

__version__ = "0.1.0"
