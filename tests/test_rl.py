"""The RL stage: settings, the TRL pin, rollouts, one real training step, and two processes.

Everything runs on the synthetic tiny-d3 catalogue (40 items) with a tiny scratch model built
by `rere model` in a temporary folder, and trains from that base model (no SFT: faster, and
the rollout/training mechanics do not depend on the start point).
"""

import doctest
import inspect
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from rere import RereError, rl
from rere.cli import main
from rere.config import load_config
from rere.rewards import REWARDS

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "config" / "tiny.yaml"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

# Small, fast, and with enough signal: G = 8 of 40 items puts the target in some groups.
RL_SETS = [
    "rl.num_generations=8",
    "rl.batch_prompts=2",
    "rl.max_train_rows=8",
    "rl.max_steps=1",
    "rl.learning_rate=0.01",
    "rl.warmup_ratio=0",
    "rl.beta=0.01",
    "tracking.mlflow=false",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """data/tiny, index/tiny, models/tiny/base built with the CLI from tests/data/tiny-d3."""
    root = tmp_path_factory.mktemp("rl")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        base = ["--config", str(TINY), "-q"]
        assert main(["data", *base, "--dataset", "tiny", "--out", str(root / "data" / "tiny")]) == 0
        assert main(["index", *base, "--data", str(root / "data/tiny"), "--out", str(root / "index/tiny")]) == 0
        args = [
            "--data",
            str(root / "data/tiny"),
            "--index",
            str(root / "index/tiny"),
            "--out",
            str(root / "models/tiny/base"),
        ]
        assert main(["model", *base, *args]) == 0
    finally:
        os.chdir(cwd)
    return root


def rl_args(root: Path, variant: str, out: str, *extra: str) -> list[str]:
    return [
        "rl",
        "--config",
        str(TINY),
        "-q",
        *(x for s in [*RL_SETS, *extra] for x in ("--set", s)),
        "--variant",
        variant,
        "--data",
        str(root / "data/tiny"),
        "--index",
        str(root / "index/tiny"),
        "--model",
        str(root / "models/tiny/base"),
        "--out",
        str(root / out),
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def group_advantages(rewards: list[float]) -> list[float]:
    """GRPO's group normalisation, written out: (R - mean) / (sample std + 1e-4)."""
    g = len(rewards)
    mean = sum(rewards) / g
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (g - 1))
    return [(r - mean) / (std + 1e-4) for r in rewards]


def check_groups(records: list[dict], g: int, sampling: str = "beam") -> None:
    """Each group: one row, G completions; beams are G distinct items ranked 1..G; TRL's
    advantages are the group-normalised ReRe rewards of exactly these items."""
    for rec in records:
        assert len(rec["items"]) == len(rec["advantages"]) == g
        if sampling == "beam":
            assert len(set(rec["items"])) == g
            assert rec["ranks"] == list(range(1, g + 1))
            assert rec["logps"] == sorted(rec["logps"], reverse=True)
        cols = {
            "prompts": ["p"] * g,
            "completions": ["c"] * g,
            "target": [rec["target"]] * g,
            "item_id": rec["items"],
            "beam_rank": rec["ranks"],
            "target_in_group": [rec["target"] in rec["items"]] * g,
            "group_size": [g] * g,
        }
        rewards = [sum(v) for v in zip(*(f(**cols) for f in REWARDS["ranking"]), strict=True)]
        assert rec["advantages"] == pytest.approx(group_advantages(rewards), abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Settings and the TRL pin


def test_doctests():
    import rere.rl.rollout

    result = doctest.testmod(rere.rl.rollout)
    assert result.attempted >= 4 and result.failed == 0


def test_settings_refuse_bad_combinations():
    config = load_config([TINY])
    s = rl.RLSettings.from_config(config, "rere")
    assert (s.sampling, s.reward, s.loss, s.num_generations) == ("beam", "ranking", "grpo", 4)
    with pytest.raises(RereError, match="num_generations.*at least 2"):
        rl.RLSettings.from_config(load_config([TINY], ["rl.num_generations=1"]), "rere")
    with pytest.raises(RereError, match="sync_ref_model.*beta is 0"):
        rl.RLSettings.from_config(load_config([TINY], ["rl.beta=0"]), "rere")
    with pytest.raises(RereError, match="variant 'nope'"):
        rl.RLSettings.from_config(config, "nope")
    with pytest.raises(RereError, match="micro_batch_prompts.*does not divide rl.batch_prompts=2"):
        rl.RLSettings.from_config(load_config([TINY], ["rl.micro_batch_prompts=3"]), "rere")


def test_micro_batches_cut_one_rollout_into_accumulation_steps(tmp_path):
    """batch_prompts x G completions per optimizer step whatever the micro-batch: one
    generation batch per step (on-policy), cut into batch_prompts / micro_batch_prompts passes."""
    sets = ["rl.batch_prompts=6", "rl.micro_batch_prompts=2", "rl.gradient_checkpointing=true"]
    s = rl.RLSettings.from_config(load_config([TINY], sets), "rere")
    a = rl.grpo_args(s, tmp_path, seed=3, max_completion_length=9, trust_remote_code=False)
    assert (a.per_device_train_batch_size, a.gradient_accumulation_steps, a.steps_per_generation) == (2 * 4, 3, 3)
    assert a.generation_batch_size == 6 * 4 and a.num_iterations == 1
    assert a.gradient_accumulation_steps % (a.steps_per_generation * a.num_iterations) == 0  # old log-probs = current
    assert a.activation_checkpointing is True
    whole = rl.grpo_args(rl.RLSettings.from_config(load_config([TINY], sets[:1]), "rere"), tmp_path, 3, 9, False)
    assert (whole.per_device_train_batch_size, whole.gradient_accumulation_steps) == (6 * 4, 1)
    assert whole.generation_batch_size == a.generation_batch_size and whole.activation_checkpointing is False


@pytest.mark.parametrize(
    ("loss", "loss_type", "level"),
    [("grpo", "grpo", "token"), ("dapo", "dapo", "token"), ("gspo", "grpo", "sequence"), ("rft", "grpo", "token")],
)
def test_grpo_args_set_what_trl_defaults_differently(tmp_path, loss, loss_type, level):
    config = load_config([TINY], ["rl.beta=0.001", f"rl.variants.x={{sampling: sample, reward: rule, loss: {loss}}}"])
    s = rl.RLSettings.from_config(config, "x")
    a = rl.grpo_args(s, tmp_path, seed=3, max_completion_length=9, trust_remote_code=False)
    assert (a.loss_type, a.importance_sampling_level) == (loss_type, level)
    assert a.beta == 0.001 and a.bf16 is False and a.scale_rewards == "group"
    assert a.per_device_train_batch_size == s.batch_prompts * s.num_generations
    assert a.num_generations == 4 and a.steps_per_generation == 1 and a.temperature == s.temperature
    assert a.sync_ref_model is True and a.ref_model_mixup_alpha == 1.0
    beam = rl.RLSettings.from_config(config, "rere")
    assert rl.grpo_args(beam, tmp_path, 3, 9, False).temperature == 1.0  # log-probs of deterministic beams


def test_trl_private_api_is_the_one_we_override():
    """rere.rl relies on these parts of trl 1.16.0; if this fails, re-read the new trainer."""
    import trl
    from trl import GRPOTrainer

    assert trl.__version__ == rl.PINNED_TRL
    assert list(inspect.signature(GRPOTrainer._generate_and_score_completions).parameters) == ["self", "inputs"]
    assert "rollout_func" in inspect.signature(GRPOTrainer.__init__).parameters
    generate = inspect.getsource(GRPOTrainer._generate)
    assert "self.rollout_func(prompts, self)" in generate
    assert '{"prompt_ids", "completion_ids", "logprobs"}' in generate
    score = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    assert "= self._generate(prompts)" in score
    assert "inp[key] = values[i]" in score  # rollout columns become reward-function columns
    assert "view(-1, num_generations)" in score  # groups are consecutive in the global batch
    # ReReTrainer's sampler copies TRL's arguments; its checkpoints add the reference model.
    sampler = inspect.getsource(GRPOTrainer._get_train_sampler)
    assert (
        "RepeatSampler(" in sampler and "batch_size=self.args.generation_batch_size // self.num_generations" in sampler
    )
    assert "repeat_count=self.num_iterations * self.args.steps_per_generation" in sampler
    assert list(inspect.signature(GRPOTrainer._save_checkpoint).parameters) == ["self", "model", "trial"]
    assert list(inspect.signature(GRPOTrainer._load_from_checkpoint).parameters)[:2] == [
        "self",
        "resume_from_checkpoint",
    ]


def test_amazon_rl_is_sized_for_one_80gb_gpu():
    """config/amazon.yaml's memory arithmetic (its comments), redone from its rl keys and
    Qwen2.5-1.5B's shapes: a change of micro-batch, chunk or dtype that breaks it fails here.
    Estimates, like the comments: T = 350 tokens per sequence, 26 completion logits."""
    config = load_config([ROOT / "config/amazon.yaml"])
    s = rl.RLSettings.from_config(config, "rere")
    n_params, hidden, mlp, layers, kv_dim, vocab, t = 1.54e9, 1536, 8960, 28, 2 * 128, 151_936, 350
    weight = {"float32": 4, "model": 2}[s.train_dtype]  # bytes per parameter (the start model is bf16)
    fixed = n_params * weight * 5 + (
        2 * n_params if s.bf16 and weight == 4 else 0
    )  # w, grad, Adam m+v, ref; bf16 casts
    per_token_layer = 20 * hidden + 8 * mlp  # saved activations without checkpointing (bf16, fp32 norm inputs)
    logits = 26 * vocab * 10
    if s.gradient_checkpointing:
        per_seq = 4 * hidden * layers * t + per_token_layer * t + logits
    else:
        per_seq = per_token_layer * layers * t + logits
    train_peak = fixed + s.prompts_per_micro_batch * s.num_generations * per_seq
    rows = (s.decode_batch_prompts or s.batch_prompts) * s.num_generations
    decode_peak = fixed + rows * t * 2 * layers * kv_dim * 4 + 3 * rows * vocab * 4 + 1e9
    assert s.train_dtype == "float32" and s.bf16 and s.save_steps > 0
    assert (s.batch_prompts * s.num_generations, s.accumulation_steps) == (512, 8)  # one rollout, 8 passes
    assert fixed / 1e9 == pytest.approx(30.8 + 3.1, abs=0.1)
    assert train_peak / 1e9 == pytest.approx(43, abs=1) and decode_peak / 1e9 == pytest.approx(41, abs=1)
    assert max(train_peak, decode_peak) < 0.6 * 80e9  # room for what the estimate leaves out


# ---------------------------------------------------------------------------------------------
# Rollouts


def make_trainer(root: Path, tmp_path: Path, *sets: str):
    config = load_config([TINY], [*RL_SETS, *sets])
    args = SimpleNamespace(
        variant="rere",
        data=str(root / "data/tiny"),
        index=str(root / "index/tiny"),
        model=str(root / "models/tiny/base"),
        sasrec=None,
    )
    inp = rl.load_inputs(args, config)
    return inp, rl.build_trainer(inp, config, tmp_path / "ckpt")


def test_latest_prompt_pool_keeps_each_users_longest_train_history(tiny, tmp_path):
    """rl.prompt_pool=latest: one prompt per user, the train row with the user's longest history
    (leave-one-out: the most recent one); all: every train row."""
    import rere.rl.inputs
    from rere.io import read_split

    assert doctest.testmod(rere.rl.inputs).failed == 0
    rows = read_split(tiny / "data/tiny/train.csv")
    longest = {}
    for row in rows:
        longest[row["user_id"]] = max(longest.get(row["user_id"], 0), len(row["history_item_id"]))
    assert len(longest) < len(rows)  # the test means something only if users have several rows
    inp, _ = make_trainer(tiny, tmp_path, "rl.prompt_pool=latest", "rl.max_train_rows=null")
    assert len(inp.train) == len(longest)
    assert sorted(len(r["history"]) for r in inp.train) == sorted(longest.values())
    every, _ = make_trainer(tiny, tmp_path / "all", "rl.prompt_pool=all", "rl.max_train_rows=null")
    assert len(every.train) == len(rows)
    with pytest.raises(RereError, match="rl.prompt_pool"):
        load_config([TINY], ["rl.prompt_pool=newest"])


def test_beam_rollout_gives_g_distinct_items_per_prompt_in_beam_order(tiny, tmp_path):
    from rere.decoding import beam_search

    inp, trainer = make_trainer(tiny, tmp_path)
    g = 8
    rows = [dict(inp.train[0]), dict(inp.train[3])]
    batch = [dict(r) for r in rows for _ in range(g)]  # TRL's layout: each prompt G times
    trainer._rere_inputs = batch
    out = trainer._rollout([r["prompt"] for r in batch], trainer)

    ids = inp.tokenizer([r["prompt"] for r in rows])["input_ids"]
    expected = beam_search(inp.model, ids, inp.trie, g, inp.tokenizer.pad_token_id)
    valid = set(inp.index.item_ids)
    for k, row in enumerate(rows):
        part = slice(k * g, (k + 1) * g)
        items = out["item_id"][part]
        assert len(set(items)) == g and set(items) <= valid
        assert items == [inp.index.item_ids[pos] for pos, _ in expected[k]]  # best first
        assert out["beam_rank"][part] == list(range(1, g + 1))
        assert out["completion_ids"][part] == [inp.item_seqs[pos] for pos, _ in expected[k]]
        assert out["target_in_group"][part] == [row["target"] in items] * g
        assert all(p == ids[k] for p in out["prompt_ids"][part])
    assert out["logprobs"] is None and out["group_size"] == [g] * (2 * g)


def test_rollout_refuses_a_broken_group(tiny, tmp_path):
    inp, trainer = make_trainer(tiny, tmp_path)
    batch = [dict(inp.train[0])] * 7 + [dict(inp.train[1])] * 9
    trainer._rere_inputs = batch
    with pytest.raises(RuntimeError, match="group 0 mixes rows"):
        trainer._rollout([r["prompt"] for r in batch], trainer)


@pytest.mark.parametrize("sampling", ["sample", "dynamic"])
def test_sampled_rollouts_are_valid_and_ranked(tiny, tmp_path, sampling):
    inp, trainer = make_trainer(tiny, tmp_path, f"rl.variants.rere={{sampling: {sampling}, reward: rule}}")
    g = 8
    batch = [dict(inp.train[2])] * g
    trainer._rere_inputs = batch
    out = trainer._rollout([r["prompt"] for r in batch], trainer)
    items = out["item_id"]
    assert len(items) == g and set(items) <= set(inp.index.item_ids)
    assert min(out["beam_rank"]) == 1 and max(out["beam_rank"]) == len(set(items))
    if sampling == "dynamic":  # distinct items first
        n = len(set(items))
        assert len(set(items[:n])) == n


# ---------------------------------------------------------------------------------------------
# Training


def test_one_training_step_changes_the_policy_and_logs(tiny):
    import torch

    from rere.model import load_model

    results = tiny / "results/tiny/rere"
    assert main([*rl_args(tiny, "rere", "models/tiny/rere", "rl.batch_prompts=4"), "--eval-out", str(results)]) == 0
    out = tiny / "models/tiny/rere"
    metrics = json.loads((results / "metrics.json").read_text())  # the final evaluation, as `rere evaluate`
    assert metrics["method"] == "rere" and metrics["invalid"] == 0 and 0 <= metrics["ndcg@5"] <= 1
    meta = json.loads((out / "rere.json").read_text())
    assert meta["stage"] == "rl" and meta["variant"] == "rere"
    assert not (tiny / "models/tiny/rere.partial").exists()

    before, _, _ = load_model(tiny / "models/tiny/base")
    after, _, _ = load_model(out)
    changed = [
        n
        for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters(), strict=True)
        if not torch.equal(a, b)
    ]
    assert changed, "one GRPO step left every parameter unchanged"

    logs = read_jsonl(out / "trainer_log.jsonl")
    step = next(r for r in logs if "loss" in r and r["step"] == 1)
    for key in (
        "rewards/rule/mean",
        "rewards/ranking/mean",
        "rewards/ranking/std",
        "reward",
        "kl",
        "rollout/target_in_group",
        "rollout/distinct_items",
    ):
        assert key in step, key
    assert step["rollout/distinct_items"] == 8.0  # beams are distinct

    groups = read_jsonl(out / "rollouts.jsonl")
    assert len(groups) == 4 and all(rec["step"] == 0 for rec in groups)
    assert any(rec["target"] in rec["items"] for rec in groups), "no group holds its target: no learning signal"
    assert step["rollout/target_in_group"] == pytest.approx(
        sum(rec["target"] in rec["items"] for rec in groups) / len(groups)
    )
    check_groups(groups, g=8)


def one_step(root: Path, tmp_path: Path, *sets: str):
    """Weights after one optimizer step (plain SGD) and the gradient it was given."""
    from transformers import TrainerCallback, set_seed

    grads = {}

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    set_seed(0)
    _, trainer = make_trainer(root, tmp_path, "rl.batch_prompts=4", *sets)
    trainer.args.optim = "sgd"
    trainer.add_callback(Grads())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert max((after[n] - before[n]).abs().max().item() for n in after) > 1e-4, "the step changed nothing"
    return after, grads


@pytest.mark.parametrize(
    ("variant", "knobs"),
    [
        ("{sampling: beam, reward: ranking, loss: grpo}", ["micro_batch_prompts=1", "gradient_checkpointing=true",
                                                           "decode_batch_prompts=1"]),
        ("{sampling: beam, reward: ranking, loss: dapo}", ["micro_batch_prompts=2"]),
        ("{sampling: beam, reward: ranking, loss: gspo}", ["micro_batch_prompts=1"]),
        ("{sampling: sample, reward: rule, loss: grpo}", ["micro_batch_prompts=1", "gradient_checkpointing=true"]),
    ],
)  # fmt: skip
def test_micro_batches_give_the_same_step(tiny, tmp_path, variant, knobs):
    """One step of 4 prompts x G = 8 in micro-batches (gradient accumulation, checkpointing,
    chunked decoding) equals one step in one pass: grpo's per-micro-batch means are divided
    by the number of micro-batches, dapo's token sums by the rollout's token count, so the
    accumulated gradient is the full batch's up to float32 rounding. Compared through SGD:
    AdamW's first step, g / (|g| + eps), turns rounding-level differences at |g| ~ eps into
    differences of up to lr / eps, whatever the batching."""
    import torch

    one = one_step(tiny, tmp_path / "one", f"rl.variants.rere={variant}")
    split = one_step(tiny, tmp_path / "split", f"rl.variants.rere={variant}", *(f"rl.{k}" for k in knobs))
    for name in one[1]:
        torch.testing.assert_close(split[1][name], one[1][name], rtol=1e-5, atol=1e-8, msg=name)
    for name in one[0]:
        torch.testing.assert_close(split[0][name], one[0][name], rtol=0, atol=1e-6, msg=name)


def test_rft_step_is_the_cross_entropy_of_the_targets_in_the_groups_that_hold_them(tiny, tmp_path):
    """loss rft: the advantages are 1 on the completion that names the group's target and 0 on
    the others, so (beta 0, no clipping) the step's gradient is, by hand from the start model,
    the sum over the groups holding their target of the target completion's mean per-token
    cross-entropy, divided by the B x G completions of the batch."""
    import torch
    from transformers import TrainerCallback, set_seed

    from rere.model import load_model

    grads, logged = {}, []

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    set_seed(0)
    inp, trainer = make_trainer(
        tiny, tmp_path, "rl.variants.rere={sampling: beam, reward: rule, loss: rft}", "rl.batch_prompts=4",
        "rl.beta=0", "rl.sync_ref_model=false", "rl.max_grad_norm=1e9", "rl.filter_groups=true",
        "rl.filter_max_prompts=8",
    )  # fmt: skip
    trainer.add_callback(Grads())
    log_groups = trainer._log_groups
    trainer._log_groups = lambda adv: (logged.append(adv.detach().clone()), log_groups(adv))
    trainer.train()
    groups, g = trainer._rere_groups, 8
    hits = [[float(item == grp["target"]) for item in grp["items"]] for grp in groups]
    assert logged[0].tolist() == [h for row in hits for h in row]
    assert 1 <= sum(map(sum, hits)) < len(groups) * g  # some groups hold their target, each once

    model, tokenizer, _ = load_model(tiny / "models/tiny/base", for_training=True)
    pos_of = {item: p for p, item in enumerate(inp.index.item_ids)}
    for grp in groups:
        if grp["target"] in grp["items"]:
            prompt = tokenizer(text=[inp.train[grp["row"]]["prompt"]])["input_ids"][0]
            completion = list(inp.item_seqs[pos_of[grp["target"]]])
            ids = torch.tensor([prompt + completion])
            labels = torch.tensor([[-100] * len(prompt) + completion])
            (model(input_ids=ids, labels=labels).loss / (len(groups) * g)).backward()
    for name, p in model.named_parameters():
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(grads.get(name, torch.zeros_like(p)), expected, rtol=1e-4, atol=1e-7, msg=name)


def test_float32_training_of_a_bf16_start_model(tiny, tmp_path):
    """rl.train_dtype float32: a bf16 start model trains with float32 weights (and reference),
    and the policy is saved in bf16 again, as the start model was."""
    import torch
    from safetensors.torch import load_file

    from rere.model import load_model, save_model

    model, tokenizer, meta = load_model(tiny / "models/tiny/base")
    start = tmp_path / "bf16"
    save_model(model.to(torch.bfloat16), tokenizer, start, meta, load_config([TINY]))
    config = load_config([TINY], [*RL_SETS, "rl.train_dtype=float32"])
    args = SimpleNamespace(
        variant="rere", data=str(tiny / "data/tiny"), index=str(tiny / "index/tiny"), model=str(start), sasrec=None
    )
    inp = rl.load_inputs(args, config)
    assert inp.model.dtype == torch.float32 and inp.save_dtype == torch.bfloat16
    assert rl.build_trainer(inp, config, tmp_path / "ckpt").ref_model.dtype == torch.float32

    out = tmp_path / "rl"
    assert (
        main([*rl_args(tiny, "rere", "unused", "rl.train_dtype=float32"), "--model", str(start), "--out", str(out)])
        == 0
    )
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_keep_groups_intact(tiny):
    """torchrun, 2 CPU processes (gloo): 2 x 3 prompts of G = 4 per step. Every group is one
    row with 4 distinct beams, and the advantages TRL trained on are that group's
    normalised rewards (a misaligned slice would pair items with another row's target)."""
    out = tiny / "models/tiny/rere2p"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "rere.cli", *rl_args(tiny, "rere", "models/tiny/rere2p", "rl.num_generations=4", "rl.batch_prompts=3",
                                   "rl.max_train_rows=24", "rl.max_steps=2"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "rl_summary.json").read_text())["processes"] == 2
    groups = read_jsonl(out / "rollouts.jsonl")
    assert [sum(r["step"] == s for r in groups) for s in (0, 1)] == [6, 6]  # 2 processes x 3 prompts
    for s in (0, 1):
        rows = [r["row"] for r in groups if r["step"] == s]
        assert len(set(rows)) == 6
    check_groups(groups, g=4)


# ---------------------------------------------------------------------------------------------
# Dynamic sampling (rl.filter_groups)


def test_filtered_batch_holds_only_groups_with_reward_variance(tiny, tmp_path):
    """With a decode budget large enough, every group handed to TRL has unequal rewards; the
    groups without signal are decoded, counted and left out; the rollout reuses the decoded
    beams rather than decoding again."""
    inp, trainer = make_trainer(
        tiny, tmp_path, "rl.filter_groups=true", "rl.filter_max_prompts=8", "rl.max_train_rows=null"
    )
    g = 8
    batch = [dict(inp.train[k]) for k in (0, 1) for _ in range(g)]
    chosen = trainer._groups_with_signal(batch)
    assert len(chosen) == len(batch)
    rows = [chosen[i] for i in range(0, len(chosen), g)]
    assert all(chosen[i : i + g] == [rows[i // g]] * g for i in range(0, len(chosen), g))  # G copies each
    decoded = trainer._metrics["train"]["rollout/decoded_prompts"][-1]
    share = trainer._metrics["train"]["rollout/signal_share_decoded"][-1]
    assert 2 <= decoded <= 8
    with_signal = [r for r in rows if trainer._has_signal(r, trainer._rere_predecoded[int(r["row"])])]
    if share * decoded >= 2:  # enough signal in the budget: only groups with signal are kept
        assert len(with_signal) == 2
    else:  # the budget ran out: all signal groups found are kept, the rest filled
        assert len(with_signal) == round(share * decoded)

    trainer._rere_inputs = chosen
    trainer._decode = lambda *a, **k: pytest.fail("the rollout decoded a group the filter had decoded")
    out = trainer._rollout([r["prompt"] for r in chosen], trainer)
    for k, row in enumerate(rows):
        picks = trainer._rere_predecoded[int(row["row"])]
        assert out["item_id"][k * g : (k + 1) * g] == [inp.index.item_ids[p] for p, _ in picks]


def test_group_signal_is_reward_variance(tiny, tmp_path):
    """A group whose beams hold the target has signal under rule + ranking; one without, none."""
    inp, trainer = make_trainer(tiny, tmp_path, "rl.filter_groups=true")
    g = 8
    row = dict(inp.train[0])
    pos_of = {item: p for p, item in enumerate(inp.index.item_ids)}
    others = [i for i in inp.index.item_ids if i != row["target"]][:g]
    without = [(pos_of[i], -1.0 - k) for k, i in enumerate(others)]
    with_target = [(pos_of[row["target"]], -0.5)] + without[: g - 1]
    assert trainer._has_signal(row, with_target)
    assert not trainer._has_signal(row, without)
