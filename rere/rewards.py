"""Reward functions for the RL stage, in TRL's form: `name(prompts, completions, **columns) -> list[float]`.

TRL calls each function with one entry per completion (the G completions of a prompt are
consecutive) and passes every dataset column and every rollout column as a keyword list of the
same length. The columns these functions read:

- `target`: the item id the user interacted with next (dataset column);
- `item_id`: the catalogue item id the completion names (rollout column);
- `beam_rank`: 1-based rank of the completion in its group, 1 = most probable (rollout column;
  for sampled groups, 1 + the number of distinct items in the group with a higher log-prob);
- `target_in_group`: whether the target is among the group's G completions (rollout column).
  It is computed where the whole group is visible: under several processes a group can be
  split across processes, and a reward function only sees its local share;
- `group_size`: G, the number of completions of the group (rollout column);
- `history`: the user's previous item ids (dataset column; collaborative only).

A function's `__name__` is TRL's metric key (`rewards/ranking/mean`). `REWARDS` maps the rl
variant's `reward` to the functions TRL sums; `reward_funcs` binds the resources that the
semantic and collaborative rewards need (TRL reads the name through `functools.partial`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np

from rere import RereError

RewardFunc = Callable[..., list[float]]


def rule(
    prompts: Sequence, completions: Sequence, *, target: Sequence[int], item_id: Sequence[int], **kwargs
) -> list[float]:
    """Rule reward: 1 if the completion names the target item, else 0.

    >>> rule(prompts=["p"] * 3, completions=["a", "b", "c"], target=[5, 5, 5], item_id=[7, 5, 9])
    [0.0, 1.0, 0.0]
    """
    return [1.0 if int(i) == int(t) else 0.0 for i, t in zip(item_id, target, strict=True)]


def rank_weight(rank: int) -> float:
    """NDCG-style weight of a 1-based rank: 1 / log2(rank + 1).

    >>> rank_weight(1), rank_weight(3)
    (1.0, 0.5)
    """
    return 1.0 / math.log2(rank + 1)


def ranking(
    prompts: Sequence,
    completions: Sequence,
    *,
    target: Sequence[int],
    item_id: Sequence[int],
    beam_rank: Sequence[int],
    target_in_group: Sequence[bool],
    group_size: Sequence[int],
    **kwargs,
) -> list[float]:
    """ReRe's ranking penalty for the wrong items of a group that contains the target.

    With completions o_1..o_G in beam order (k = 1 most probable) and Z = sum_{j=1..G} 1/log2(j+1):
    if the target y is among the group's completions,
        r_rank(o_k) = 0 if o_k == y, else -(1/log2(k+1)) / Z;
    if y is not among them, r_rank = 0 for the whole group. The most probable wrong items get
    the largest penalties. (The penalties of a group sum to -(Z - 1/log2(k_y+1)) / Z: close to
    -1, and exactly -1 only in the limit of a target ranked far down.)

    A group of G = 3 with the target at rank 2: Z = 1 + 1/log2(3) + 1/2 = 2.1309...

    >>> r = ranking(prompts=["p"] * 3, completions=["a", "b", "c"], target=[5] * 3, item_id=[7, 5, 9],
    ...             beam_rank=[1, 2, 3], target_in_group=[True] * 3, group_size=[3] * 3)
    >>> [round(x, 4) for x in r]
    [-0.4693, 0.0, -0.2346]
    >>> ranking(prompts=["p"] * 2, completions=["a", "b"], target=[5] * 2, item_id=[7, 9],
    ...         beam_rank=[1, 2], target_in_group=[False] * 2, group_size=[2] * 2)
    [0.0, 0.0]
    """
    out = []
    for i, t, k, hit, g in zip(item_id, target, beam_rank, target_in_group, group_size, strict=True):
        if not hit or int(i) == int(t):
            out.append(0.0)
            continue
        if not 1 <= int(k) <= int(g):
            raise ValueError(f"beam_rank {k} is outside 1..{g}")
        z = sum(rank_weight(j) for j in range(1, int(g) + 1))
        out.append(-rank_weight(int(k)) / z)
    return out


def ranking_only(prompts: Sequence, completions: Sequence, **columns) -> list[float]:
    """The ranking penalty alone (no +1 for the target): the ablation without the rule reward.

    >>> r = ranking_only(prompts=["p"] * 2, completions=["a", "b"], target=[5] * 2, item_id=[5, 9],
    ...                  beam_rank=[1, 2], target_in_group=[True] * 2, group_size=[2] * 2)
    >>> [round(x, 4) for x in r]
    [0.0, -0.3869]
    """
    return ranking(prompts, completions, **columns)


def semantic(
    prompts: Sequence,
    completions: Sequence,
    *,
    target: Sequence[int],
    item_id: Sequence[int],
    item_vectors: np.ndarray,
    **kwargs,
) -> list[float]:
    """Cosine similarity of the target's and the generated item's embeddings (rows of
    `item_vectors`, indexed by item id; bound by `reward_funcs`). 1 for the target itself.

    >>> vectors = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    >>> [round(x, 4) for x in semantic(prompts=["p"] * 3, completions=["a", "b", "c"], target=[0] * 3,
    ...                                item_id=[0, 1, 2], item_vectors=vectors)]
    [1.0, 0.0, 0.7071]
    """
    norms = np.linalg.norm(item_vectors, axis=1)
    out = []
    for i, t in zip(item_id, target, strict=True):
        denom = norms[int(i)] * norms[int(t)]
        out.append(float(item_vectors[int(i)] @ item_vectors[int(t)] / denom) if denom > 0 else 0.0)
    return out


def collaborative(
    prompts: Sequence,
    completions: Sequence,
    *,
    history: Sequence[Sequence[int]],
    item_id: Sequence[int],
    scorer: Callable[[list[list[int]], list[int]], list[float]],
    **kwargs,
) -> list[float]:
    """A trained sequential recommender's score of the generated item given the user's history.

    `scorer(histories, items) -> scores` is bound by `reward_funcs` (SASRec from `rere baseline`).
    The score is the model's logit; GRPO normalises rewards per group, so its scale does not matter.

    >>> collaborative(prompts=["p"] * 2, completions=["a", "b"], history=[[1, 2]] * 2, item_id=[3, 4],
    ...               scorer=lambda hs, items: [float(h[-1] * 10 + i) for h, i in zip(hs, items)])
    [23.0, 24.0]
    """
    return [float(s) for s in scorer([list(map(int, h)) for h in history], [int(i) for i in item_id])]


# rl variant `reward` -> the reward functions TRL sums (each logged under its own name).
REWARDS: dict[str, list[RewardFunc]] = {
    "rule": [rule],
    "ranking": [rule, ranking],
    "ranking_only": [ranking_only],
    "semantic": [semantic],
    "collaborative": [collaborative],
}


def reward_funcs(
    name: str,
    item_vectors: np.ndarray | None = None,
    scorer: Callable[[list[list[int]], list[int]], list[float]] | None = None,
) -> list[RewardFunc]:
    """The reward functions of the rl variant's `reward`, with the resources they need bound.

    >>> [f.__name__ for f in reward_funcs("ranking")]
    ['rule', 'ranking']
    """
    if name not in REWARDS:
        raise RereError(f"unknown reward '{name}' (known: {', '.join(REWARDS)}); fix the rl variant's `reward`.")
    out: list[RewardFunc] = []
    for func in REWARDS[name]:
        if func is semantic:
            if item_vectors is None:
                raise RereError("reward 'semantic' needs item embeddings; none were given.")
            out.append(functools.partial(semantic, item_vectors=np.asarray(item_vectors, dtype=np.float64)))
        elif func is collaborative:
            if scorer is None:
                raise RereError("reward 'collaborative' needs a trained SASRec (run `rere baseline --method sasrec`).")
            out.append(functools.partial(collaborative, scorer=scorer))
        else:
            out.append(func)
    return out
