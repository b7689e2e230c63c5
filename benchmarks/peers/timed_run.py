"""Run a training entry point with a step timer attached to whatever transformers Trainer it builds.

    python timed_run.py --out timings.json --module FlagEmbedding.finetune.embedder.encoder_only.base -- ARGS...
    python timed_run.py --out timings.json --script st_train.py -- ARGS...

The same file runs in every tool's virtual environment (standard library + transformers only), so the three tools
are timed by identical code: ``transformers.Trainer.__init__`` is wrapped to append a callback that records the wall
clock at the end of every optimizer step (data loading, forward, backward and optimizer step all fall between two
step ends). At exit it writes the step-end times, the process's peak resident memory (also as it stood at each step
end and at the end of training) and the thread count.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.metadata
import json
import os
import resource
import runpy
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--module")
    target.add_argument("--script")
    args, rest = parser.parse_known_args()
    if rest and rest[0] == "--":
        rest = rest[1:]

    import torch
    import transformers

    record: dict = {"start": time.perf_counter(), "step_end": [], "step_peak_rss_gib": [], "argv": rest}

    def peak_gib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2

    class StepTimer(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record["train_begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            record["step_end"].append(time.perf_counter())
            record["step_peak_rss_gib"].append(round(peak_gib(), 3))  # the peak so far: where it is reached

        def on_train_end(self, args, state, control, **kwargs):
            record["train_end_peak_rss_gib"] = peak_gib()  # before the model is saved

    original_init = transformers.Trainer.__init__

    def init_with_timer(self, *a, **kw):
        original_init(self, *a, **kw)
        self.add_callback(StepTimer())

    transformers.Trainer.__init__ = init_with_timer

    def write() -> None:
        record["end"] = time.perf_counter()
        record["peak_rss_gib"] = peak_gib()
        record["children_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
        record["torch_threads"] = torch.get_num_threads()
        record["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
        record["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
        for name in ("FlagEmbedding", "sentence-transformers", "rir-finetune"):
            try:
                record["versions"][name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                pass
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, args.out)

    atexit.register(write)
    if args.module:
        sys.argv = [args.module, *rest]
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [args.script, *rest]
        runpy.run_path(args.script, run_name="__main__")


if __name__ == "__main__":
    main()
