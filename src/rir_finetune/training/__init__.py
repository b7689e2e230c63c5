"""Training the bi-encoder: arguments -> data -> sampler -> collator -> model -> objectives -> trainer -> saving.

:mod:`.train` is the ``train`` command; :mod:`.distributed` is the only module that touches ``torch.distributed``;
:mod:`.gradcache` and :mod:`.lora` are options of the step; :mod:`.train_eval` scores the in-memory model during
training.
"""
