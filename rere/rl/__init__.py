"""ReRe reinforcement learning (`rere rl`), one file per idea:

- `settings.py`: `RLSettings` (the `rl` section and one variant) and its TRL `GRPOConfig`.
- `rollout.py`: pure functions over one group of G completions (ranks, distinct-first, stats).
- `trainer.py`: `ReReTrainer`, TRL's GRPOTrainer with the constrained-beam rollout.
- `inputs.py`: everything the stage reads, checked before training (model, index, trie,
  train rows, reward resources).
- `stage.py`: the `rere rl` command: trainer, callbacks, resumable output folder, publishing.

The rewards themselves are in `rere.rewards`; `rere bench rl` is in `rere.bench.rl`.
"""

from rere.rl.inputs import RLInputs, load_inputs
from rere.rl.settings import LOSSES, PINNED_TRL, RLSettings, grpo_args
from rere.rl.stage import add_arguments, build_trainer, run

__all__ = [
    "LOSSES",
    "PINNED_TRL",
    "RLInputs",
    "RLSettings",
    "add_arguments",
    "build_trainer",
    "grpo_args",
    "load_inputs",
    "run",
]
