"""``python -m llama_cpp.server`` with this project's llama.cpp defaults: ``python -m rir_finetune.llm.llama_server``.

The same options as llama_cpp.server (``--model FILE.gguf --host 127.0.0.1 --port 8000`` ...). What differs: the
CPU extra buffer types follow :func:`rir_finetune.llm.llamacpp_backend.extra_buffers_wanted` (off on AMX CPUs,
where llama-cpp-python 0.3.36 built natively segfaults in ``llama_decode``), so the ``openai`` backend against this
server and the ``llama_cpp`` backend run the same kernels and give the same greedy answers.
"""

from __future__ import annotations

import sys

from rir_finetune.errors import UserError
from rir_finetune.llm.llamacpp_backend import _model_params, extra_buffers_wanted


def main() -> None:
    try:
        extra = extra_buffers_wanted()
        from llama_cpp.server.__main__ import main as serve
    except UserError as e:
        sys.exit(f"error: {e}")
    except ImportError:
        sys.exit("error: llama_cpp.server needs pip install 'rir-finetune[llamacpp]'")
    with _model_params(use_extra_bufts=extra):
        serve()


if __name__ == "__main__":
    main()
