"""Reward functions against groups computed by hand.

For G = 4 the rank weights 1/log2(k+1) are 1, 0.63093, 0.5, 0.43068 and their sum is
Z = 2.56161, so the penalties of wrong items at ranks 1..4 are -0.39038, -0.24630, -0.19519,
-0.16813 (worked out on paper, not with the code under test).
"""

import doctest
import functools

import numpy as np
import pytest

from rere import RereError, rewards
from rere.rewards import REWARDS, ranking, ranking_only, reward_funcs, rule, semantic


def group(items, target):
    """Columns TRL passes for one group of completions in beam order."""
    g = len(items)
    return {
        "prompts": ["p"] * g,
        "completions": [f"c{i}" for i in items],
        "target": [target] * g,
        "item_id": list(items),
        "beam_rank": list(range(1, g + 1)),
        "target_in_group": [target in items] * g,
        "group_size": [g] * g,
    }


def total(cols):
    """What TRL sums for the ReRe variant (reward: ranking = rule + ranking)."""
    per_func = [f(**cols) for f in REWARDS["ranking"]]
    return [sum(v) for v in zip(*per_func, strict=True)]


def test_doctests():
    result = doctest.testmod(rewards)
    assert result.attempted >= 8 and result.failed == 0


def test_target_first():
    cols = group([7, 3, 9, 4], target=7)
    assert rule(**cols) == [1.0, 0.0, 0.0, 0.0]
    assert ranking(**cols) == pytest.approx([0.0, -0.24630, -0.19519, -0.16813], abs=1e-5)
    assert total(cols) == pytest.approx([1.0, -0.24630, -0.19519, -0.16813], abs=1e-5)


def test_target_last():
    cols = group([7, 3, 9, 4], target=4)
    assert ranking(**cols) == pytest.approx([-0.39038, -0.24630, -0.19519, 0.0], abs=1e-5)
    assert total(cols) == pytest.approx([-0.39038, -0.24630, -0.19519, 1.0], abs=1e-5)
    # the most probable wrong item is penalised most
    assert ranking(**cols)[0] < ranking(**cols)[1] < ranking(**cols)[2]


def test_target_absent_gives_no_penalty():
    cols = group([7, 3, 9, 4], target=11)
    assert rule(**cols) == [0.0] * 4
    assert ranking(**cols) == [0.0] * 4


def test_single_generation():
    assert total(group([7], target=7)) == [1.0]
    assert total(group([7], target=8)) == [0.0]


def test_penalties_of_a_group():
    # target at rank 2 of G = 4: penalties sum to -(Z - 0.63093) / Z = -0.75370
    cols = group([7, 3, 9, 4], target=3)
    assert sum(ranking(**cols)) == pytest.approx(-0.75370, abs=1e-5)


def test_ranking_only_has_no_rule_term():
    cols = group([7, 3], target=7)
    assert ranking_only(**cols) == pytest.approx([0.0, -0.38685], abs=1e-5)
    assert [f.__name__ for f in reward_funcs("ranking_only")] == ["ranking_only"]


def test_split_group_uses_the_group_column():
    # Under 2 processes a process may see only ranks 3..4 of a group whose target is at rank 1:
    # the penalty must still apply, because target_in_group is computed on the whole group.
    cols = group([7, 3, 9, 4], target=7)
    local = {k: v[2:] for k, v in cols.items()}
    assert ranking(**local) == pytest.approx([-0.19519, -0.16813], abs=1e-5)


def test_rank_out_of_range_is_an_error():
    cols = group([7, 3], target=7)
    cols["beam_rank"] = [1, 5]
    with pytest.raises(ValueError, match="beam_rank 5"):
        ranking(**cols)


def test_semantic_cosine_by_hand():
    vectors = np.array([[3.0, 4.0], [4.0, 3.0], [-3.0, -4.0]])
    cols = group([0, 1, 2], target=0)
    (func,) = reward_funcs("semantic", item_vectors=vectors)
    assert func.func is semantic and isinstance(func, functools.partial)
    # (3*4 + 4*3) / 25 = 0.96
    assert func(**cols) == pytest.approx([1.0, 0.96, -1.0])


def test_collaborative_binds_the_scorer():
    seen = []

    def scorer(histories, items):
        seen.append((histories, items))
        return [0.5 * i for i in items]

    (func,) = reward_funcs("collaborative", scorer=scorer)
    out = func(prompts=["p"] * 2, completions=["a", "b"], history=[[1, 2], [1, 2]], item_id=[4, 6], target=[4, 4])
    assert out == [2.0, 3.0]
    assert seen == [([[1, 2], [1, 2]], [4, 6])]


def test_reward_names_and_missing_resources():
    assert [f.__name__ for f in reward_funcs("ranking")] == ["rule", "ranking"]
    assert set(REWARDS) == {"rule", "ranking", "ranking_only", "semantic", "collaborative"}
    with pytest.raises(RereError, match="semantic"):
        reward_funcs("semantic")
    with pytest.raises(RereError, match="sasrec"):
        reward_funcs("collaborative")
    with pytest.raises(RereError, match="unknown reward 'nope'"):
        reward_funcs("nope")
