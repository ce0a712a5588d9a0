"""`rere rl`: ReRe reinforcement learning from the SFT model (TRL GRPOTrainer, our rollouts).

    rere rl --variant V --data data/D --index index/D --model models/D/sft --out models/D/V \\
        [--eval-out results/D/V]

For each train prompt (a user's history, target y) the policy writes G catalogue items and
GRPO pushes up the ones with above-group-average reward. ReRe changes two things in TRL's
GRPOTrainer, and only those two are replaced here (`ReReTrainer`):

1. The rollout. TRL repeats every prompt G times and samples each copy on its own; in a
   catalogue-constrained space that repeats the same few items. We take each prompt once,
   run constrained beam search with G beams (`sampling: beam`: G distinct valid items, best
   first), or constrained sampling (`sample`), or over-sample 1.5G and keep G with distinct
   items first (`dynamic`), and hand the G completions back in the repeated order TRL
   expects, with each completion's item id and rank as reward columns.
2. The rewards (rere.rewards): rule (1 for the target), ReRe's ranking penalty, and the
   ablations, as ordinary TRL reward functions.

Everything else comes from TRL options: group-normalised advantages (scale_rewards "group"),
the clipped policy-gradient loss (`loss: grpo` -> loss_type "grpo", `dapo` -> "dapo", `gspo`
-> loss_type "grpo" with importance_sampling_level "sequence"), the k3 KL penalty to a
reference model (beta), reference sync, logging, checkpoints.

Several processes (`accelerate launch --num_processes N`): TRL's sampler spreads a prompt's G
copies over consecutive positions of the global batch, so a group can straddle two processes.
The rollout therefore gathers every process's prompts, decodes each group once (groups are
shared out between processes), gathers the results and gives each process its own slice; the
columns that need the whole group (does it contain the target?) are computed there, before
TRL gathers the rewards and normalises them per group.

Pinned to trl 1.16.0: the rollout goes through GRPOTrainer's `rollout_func` hook, and
`_generate_and_score_completions(inputs)` is wrapped to hand the batch's rows to the rollout
and to log it; tests/test_rl.py fails loudly if either changes.

Outputs in `--out`: the policy (HF folder, rere.json stage "rl" with the variant),
trainer_log.jsonl (every log dict: reward per function, KL, loss, rollout statistics,
periodic validation HR/NDCG), rollouts.jsonl (every group: row, target, items, ranks,
advantages), config.yaml. `bench_rl` (`rere bench rl`) times beam rollouts against TRL's
default sampling.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from rere import RereError
from rere.io import atomic_path, read_split

log = logging.getLogger(__name__)

TRAINER_LOG = "trainer_log.jsonl"
ROLLOUT_LOG = "rollouts.jsonl"
CHECKPOINTS = "checkpoints"
PINNED_TRL = "1.16.0"

# `loss` -> (TRL loss_type, importance_sampling_level)
LOSSES = {
    "grpo": ("grpo", "token"),  # per-sequence mean of token terms, then mean over sequences
    "dapo": ("dapo", "token"),  # token-level normalisation over the whole batch
    "gspo": ("grpo", "sequence"),  # one length-normalised ratio per sequence (GSPO paper setup)
}


def add_arguments(parser) -> None:
    parser.add_argument("--variant", required=True, help="name of an entry in rl.variants (e.g. rere)")
    parser.add_argument("--data", required=True, help="dataset folder from `rere data`")
    parser.add_argument("--index", required=True, help="item index folder from `rere index`")
    parser.add_argument("--model", required=True, help="start model folder (models/D/sft, or models/D/base)")
    parser.add_argument("--out", required=True, help="output model folder, e.g. models/D/rere")
    parser.add_argument("--eval-out", default=None, help="also evaluate the policy here (as `rere evaluate` does)")
    parser.add_argument(
        "--sasrec",
        default=None,
        help="folder of a trained SASRec (`rere baseline --method sasrec`); reward collaborative",
    )


# ---------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass
class RLSettings:
    """The `rl` config section and one variant (descriptions in workflow/schemas/config.schema.yaml)."""

    variant: str
    sampling: str = "beam"
    reward: str = "ranking"
    loss: str = "grpo"
    init_from: str = "sft"
    num_generations: int = 16
    learning_rate: float = 1e-5
    beta: float = 1e-3
    epochs: float = 1
    max_steps: int = 100
    max_train_rows: int | None = None
    batch_prompts: int = 8
    temperature: float = 1.0
    sync_ref_model: bool = True
    ref_model_sync_steps: int = 50
    max_grad_norm: float = 0.3
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    eval_every: int = 0
    eval_rows: int = 200
    save_steps: int = 0
    bf16: bool = False

    def __post_init__(self):
        if self.sampling not in ("beam", "sample", "dynamic"):
            raise RereError(f"rl variant '{self.variant}': sampling {self.sampling!r} is not beam, sample or dynamic.")
        if self.loss not in LOSSES:
            raise RereError(f"rl variant '{self.variant}': loss {self.loss!r} is not one of {', '.join(LOSSES)}.")
        if self.num_generations < 2:
            raise RereError(
                f"key 'rl.num_generations' is {self.num_generations}: GRPO needs at least 2 completions per prompt "
                "to compare them (a group of one has no advantage). Set it to 2 or more."
            )
        if self.sync_ref_model and self.beta == 0:
            raise RereError(
                "key 'rl.sync_ref_model' is true but rl.beta is 0, so there is no reference model to sync; "
                "set rl.sync_ref_model=false or rl.beta > 0."
            )

    @classmethod
    def from_config(cls, config: dict, variant: str) -> RLSettings:
        from rere.config import variant_config

        rl = {k: v for k, v in config["rl"].items() if k != "variants"}
        return cls(variant=variant, **variant_config(config, variant), **rl)

    @property
    def decode_temperature(self) -> float:
        """Beam search is deterministic; TRL's log-probs must then be at temperature 1."""
        return 1.0 if self.sampling == "beam" else self.temperature


def grpo_args(s: RLSettings, output_dir: str | Path, seed: int, max_completion_length: int, trust_remote_code: bool):
    """TRL's GRPOConfig for these settings. TRL's own defaults differ from ours (beta 0, loss
    "dapo", bf16 on), so every value that matters is set here explicitly."""
    import torch
    from trl import GRPOConfig

    loss_type, level = LOSSES[s.loss]
    return GRPOConfig(
        output_dir=str(output_dir),
        seed=seed,
        data_seed=seed,
        num_generations=s.num_generations,
        per_device_train_batch_size=s.batch_prompts * s.num_generations,
        gradient_accumulation_steps=1,
        steps_per_generation=1,  # one rollout per optimizer step: on-policy, old log-probs = current ones
        num_iterations=1,
        learning_rate=s.learning_rate,
        beta=s.beta,
        loss_type=loss_type,
        importance_sampling_level=level,
        scale_rewards="group",  # A = (R - mean_group) / (std_group + 1e-4)
        num_train_epochs=s.epochs,
        max_steps=s.max_steps,
        lr_scheduler_type=s.lr_scheduler,
        warmup_steps=s.warmup_ratio,  # transformers 5: a float in [0, 1) is a share of the steps
        max_grad_norm=s.max_grad_norm,
        sync_ref_model=s.sync_ref_model,
        ref_model_sync_steps=s.ref_model_sync_steps,
        ref_model_mixup_alpha=1.0,  # a sync copies the policy into the reference
        temperature=s.decode_temperature,
        max_completion_length=max_completion_length,
        disable_dropout=True,  # rollout and loss must see the same network
        bf16=s.bf16,
        fp16=False,
        shuffle_dataset=True,
        remove_unused_columns=False,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="steps" if s.save_steps > 0 else "no",
        save_steps=s.save_steps if s.save_steps > 0 else 500,
        report_to="none",
        dataloader_num_workers=0,
        log_completions=False,
        trust_remote_code=trust_remote_code,
        # On a machine without CUDA, several processes (torchrun) train on CPU with gloo.
        use_cpu=not torch.cuda.is_available(),
    )


# ---------------------------------------------------------------------------------------------
# Rollout helpers (pure functions over one group)


def sample_ranks(item_ids: Sequence[int], logps: Sequence[float]) -> list[int]:
    """Ranks of sampled completions: 1 + the number of distinct items of the group with a
    higher log-prob. Duplicates share a rank; for distinct beams in beam order it is 1..G.

    >>> sample_ranks([4, 7, 4, 2], [-1.0, -0.5, -1.0, -3.0])
    [2, 1, 2, 3]
    """
    best: dict[int, float] = {}
    for item, lp in zip(item_ids, logps, strict=True):
        best[item] = max(lp, best.get(item, -math.inf))
    return [1 + sum(1 for other, lp in best.items() if other != item and lp > best[item]) for item in item_ids]


def distinct_first(samples: Sequence[tuple[int, float]], g: int) -> list[tuple[int, float]]:
    """`dynamic` sampling: keep G of the over-sampled completions, each distinct item's first
    draw first (in draw order), then repeats in draw order if fewer than G items are distinct.

    >>> distinct_first([(4, -1.0), (4, -1.0), (7, -2.0), (4, -1.0), (9, -3.0)], 3)
    [(4, -1.0), (7, -2.0), (9, -3.0)]
    >>> distinct_first([(4, -1.0), (4, -1.0), (7, -2.0)], 3)
    [(4, -1.0), (7, -2.0), (4, -1.0)]
    """
    seen: set[int] = set()
    first, repeats = [], []
    for s in samples:
        (repeats if s[0] in seen else first).append(s)
        seen.add(s[0])
    return (first + repeats)[:g]


def group_stats(items: Sequence[Sequence[int]], targets: Sequence[int]) -> dict[str, float]:
    """Share of groups whose completions contain the target, mean distinct items per group,
    and the mean 1-based rank of the target in the groups that contain it (0 if none).

    >>> group_stats([[1, 2, 3], [4, 4, 5]], [2, 9])
    {'rollout/target_in_group': 0.5, 'rollout/distinct_items': 2.5, 'rollout/target_rank': 2.0}
    """
    hits = [list(g).index(t) + 1 for g, t in zip(items, targets, strict=True) if t in g]
    return {
        "rollout/target_in_group": len(hits) / len(items),
        "rollout/distinct_items": sum(len(set(g)) for g in items) / len(items),
        "rollout/target_rank": sum(hits) / len(hits) if hits else 0.0,
    }


# ---------------------------------------------------------------------------------------------
# The trainer


def _trainer_class():
    """ReReTrainer, defined on first use so that importing rere.rl does not import TRL."""
    global ReReTrainer
    if "ReReTrainer" in globals():
        return ReReTrainer
    import warnings

    import torch
    from accelerate.utils import gather_object
    from trl import GRPOTrainer
    from trl.models import unwrap_model_for_generation

    class _ReReTrainer(GRPOTrainer):
        """GRPOTrainer whose rollout is ReRe's (constrained beams or sampling over the catalogue)."""

        def __init__(self, *args, index, trie, item_seqs, sampling: str, rollout_log: Path | None = None, **kwargs):
            self.rere_index = index
            self.rere_trie = trie
            self.rere_item_seqs = item_seqs  # item position -> completion token ids (EOS included)
            self.rere_sampling = sampling
            self.rere_rollout_log = rollout_log
            self._rere_inputs: list[dict] | None = None
            self._rere_groups: list[dict] = []
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*'rollout_func'.*experimental")
                super().__init__(*args, rollout_func=self._rollout, **kwargs)

        # TRL calls this with the local rows of one generation batch (each prompt's G copies).
        def _generate_and_score_completions(self, inputs):
            self._rere_inputs = inputs
            try:
                output = super()._generate_and_score_completions(inputs)
            finally:
                self._rere_inputs = None
            self._log_groups(output["advantages"])
            return output

        def _decode(self, prompt_ids: list[list[int]], first_group: int) -> list[list[tuple[int, float]]]:
            """G (item position, log-prob) per prompt, in the order the completions are handed back."""
            from rere.decoding import beam_search, sample

            g = self.num_generations
            if not prompt_ids:
                return []
            pad = self.processing_class.pad_token_id
            with (
                unwrap_model_for_generation(
                    self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation
                ) as model,
                torch.no_grad(),
            ):
                was_training = model.training
                model.eval()
                try:
                    if self.rere_sampling == "beam":
                        return beam_search(model, prompt_ids, self.rere_trie, g, pad, len(prompt_ids))
                    # The draws depend on the seed, the step and the group, not on the process layout.
                    generator = torch.Generator(device=model.device)
                    generator.manual_seed(self.args.seed * 1_000_003 + self.state.global_step * 7919 + first_group)
                    n = g if self.rere_sampling == "sample" else math.ceil(1.5 * g)
                    drawn = sample(model, prompt_ids, self.rere_trie, n, self.temperature, generator, pad)
                    return drawn if self.rere_sampling == "sample" else [distinct_first(d, g) for d in drawn]
                finally:
                    model.train(was_training)

        def _rollout(self, prompts: list[str], trainer) -> dict:
            """TRL's rollout_func: completions for the local rows, each group decoded once."""
            rows = self._rere_inputs
            if rows is None or len(rows) != len(prompts):
                raise RuntimeError("ReReTrainer: the rollout was called without its batch rows (TRL changed?)")
            g = self.num_generations
            local_ids = self.processing_class(text=prompts)["input_ids"]
            local = [(int(r["row"]), int(r["target"]), ids) for r, ids in zip(rows, local_ids, strict=True)]
            everyone = gather_object(local)  # global batch, in process order
            if len(everyone) % g:
                raise RuntimeError(
                    f"global batch of {len(everyone)} completions is not a whole number of groups of {g}"
                )
            groups = [everyone[i : i + g] for i in range(0, len(everyone), g)]
            for k, grp in enumerate(groups):
                if any(x[0] != grp[0][0] for x in grp):
                    raise RuntimeError(f"group {k} mixes rows {[x[0] for x in grp]}: TRL's sampler layout changed")

            rank, world = self.accelerator.process_index, self.accelerator.num_processes
            mine = list(range(rank, len(groups), world))
            decoded = self._decode([groups[k][0][2] for k in mine], first_group=rank)
            if any(len(d) != g for d in decoded):
                raise RuntimeError(f"the rollout returned {[len(d) for d in decoded]} completions per prompt, not {g}")
            by_group = dict(gather_object(list(zip(mine, decoded, strict=True))))

            item_ids = self.rere_index.item_ids
            columns: dict[str, list] = {k: [] for k in ("item_id", "beam_rank", "target_in_group", "group_size")}
            completion_ids = []
            self._rere_groups = []
            for k, grp in enumerate(groups):
                picks = by_group[k]  # G x (item position, log-prob)
                items = [item_ids[pos] for pos, _ in picks]
                logps = [float(lp) for _, lp in picks]
                ranks = list(range(1, g + 1)) if self.rere_sampling == "beam" else sample_ranks(items, logps)
                target = grp[0][1]
                for (pos, _), item, r in zip(picks, items, ranks, strict=True):
                    completion_ids.append(list(self.rere_item_seqs[pos]))
                    columns["item_id"].append(item)
                    columns["beam_rank"].append(r)
                    columns["target_in_group"].append(target in items)
                    columns["group_size"].append(g)
                self._rere_groups.append(
                    {"row": grp[0][0], "target": target, "items": items, "ranks": ranks, "logps": logps}
                )
            for key, value in group_stats(
                [x["items"] for x in self._rere_groups], [x["target"] for x in self._rere_groups]
            ).items():
                self._metrics["train" if self.model.training else "eval"][key].append(value)

            start = rank * len(prompts)  # this process's slice of the global batch
            sl = slice(start, start + len(prompts))
            return {
                "prompt_ids": [list(x[2]) for x in local],
                "completion_ids": completion_ids[sl],
                "logprobs": None,
                **{k: v[sl] for k, v in columns.items()},
            }

        def _log_groups(self, local_advantages) -> None:
            """Append this batch's groups, with TRL's advantages, to rollouts.jsonl (main process)."""
            advantages = self.accelerator.gather(local_advantages.detach()).float().cpu().tolist()
            if self.rere_rollout_log is None or not self.accelerator.is_main_process:
                return
            g = self.num_generations
            with open(self.rere_rollout_log, "a", encoding="utf-8") as f:
                for k, grp in enumerate(self._rere_groups):
                    record = {"step": self.state.global_step, **grp, "advantages": advantages[k * g : (k + 1) * g]}
                    f.write(json.dumps(record, sort_keys=True) + "\n")

    ReReTrainer = _ReReTrainer
    return ReReTrainer


# ---------------------------------------------------------------------------------------------
# Data and resources


def training_rows(rows: list[dict], index, style: str, seed: int) -> list[dict]:
    """One TRL dataset row per train row: prompt text, target item id, history, row number."""
    from rere import prompts

    code_of = dict(zip(index.item_ids, index.codes, strict=True))
    out = []
    for i, row in enumerate(rows):
        if row["item_id"] not in code_of:
            raise RereError(
                f"train.csv line {row.get('_line', '?')}: target item {row['item_id']} is not in the index; "
                "rebuild the index from this data folder with `rere index`."
            )
        out.append(
            {
                "prompt": prompts.row_prompt(row, code_of, style, seed),
                "target": int(row["item_id"]),
                "history": [int(x) for x in row["history_item_id"]],
                "row": i,
            }
        )
    return out


def item_vectors(data: Path, config: dict):
    """Item text embeddings for the semantic reward, rows indexed by item id: the index
    stage's embedder (`index.sid`) over items.jsonl's `text`."""
    import numpy as np

    from rere.index import sentence_embeddings, tfidf_embeddings
    from rere.io import read_jsonl

    records = sorted(read_jsonl(data / "items.jsonl"), key=lambda r: int(r["item_id"]))
    texts = [str(r.get("text") or r.get("title") or "") for r in records]
    sid = config["index"]["sid"]
    if sid["embedder"] == "tfidf":
        emb = tfidf_embeddings(texts, sid["embedding_dim"], config["seed"])
    else:
        emb = sentence_embeddings(texts, sid["embedder_model"])
    out = np.zeros((max(int(r["item_id"]) for r in records) + 1, emb.shape[1]))
    out[[int(r["item_id"]) for r in records]] = emb
    return out


def collaborative_scorer(folder: str | Path | None):
    """scorer(histories, items) -> scores from a trained SASRec (rere.baselines)."""
    if folder is None:
        raise RereError(
            "reward 'collaborative' needs --sasrec results/D/sasrec (from `rere baseline --method sasrec`)."
        )
    from rere.baselines import load_sequential, score_items

    model = load_sequential(folder)

    def scorer(histories: list[list[int]], items: list[int]) -> list[float]:
        return [float(x) for x in score_items(model, histories, items)]

    return scorer


def _callbacks(log_path: Path, inp: RLInputs | None, config: dict, mlrun):
    """trainer_log.jsonl of every log dict, and (rl.eval_every) a small validation HR/NDCG."""
    from transformers import TrainerCallback

    def append(record: dict) -> None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    class JsonlLog(TrainerCallback):
        """TRL's reward per function, KL, loss, and the rollout statistics, with their step."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                append({"step": state.global_step, "epoch": state.epoch, **logs})

    class PeriodicEval(TrainerCallback):
        """`evaluate_model` (the code of `rere evaluate`) on rl.eval_rows validation rows."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            from rere.evaluate import evaluate_model

            every = inp.settings.eval_every
            if not state.is_world_process_zero or state.global_step % every:
                return
            _, _, m = evaluate_model(
                model,
                inp.tokenizer,
                inp.index,
                inp.valid_rows,
                config,
                style=inp.meta["prompt_style"],
                split="valid",
                trie=inp.trie,
                progress=False,
            )
            record = {f"valid/{k}": v for k, v in m.items() if k.startswith(("hr@", "ndcg@"))}
            log.info("step %d validation: %s", state.global_step, record)
            mlrun.log_metrics(record, step=state.global_step)
            append({"step": state.global_step, **record})

    return [JsonlLog(), mlrun.callback()] + ([PeriodicEval()] if inp is not None and inp.settings.eval_every else [])


# ---------------------------------------------------------------------------------------------
# The stage


@dataclasses.dataclass
class RLInputs:
    """Everything `rere rl` reads, checked before any training starts."""

    settings: RLSettings
    index: object  # rere.index.ItemIndex
    model: object
    tokenizer: object
    meta: dict
    train: list[dict]  # TRL dataset rows (training_rows)
    item_seqs: list[list[int]]  # item position -> completion token ids, EOS included
    trie: object  # rere.decoding.ItemTrie
    funcs: list
    valid_rows: list[dict] | None


def load_inputs(args, config) -> RLInputs:
    import trl

    from rere import prompts
    from rere.decoding import ItemTrie
    from rere.index import ItemIndex
    from rere.metrics import select_rows
    from rere.model import load_model
    from rere.rewards import reward_funcs

    if trl.__version__ != PINNED_TRL:
        raise RereError(
            f"rere rl overrides private parts of trl {PINNED_TRL} but trl {trl.__version__} is installed; "
            f"install trl=={PINNED_TRL} (pyproject pins it)."
        )
    s = RLSettings.from_config(config, args.variant)
    seed = config["seed"]
    data, start = Path(args.data), Path(args.model)
    index = ItemIndex.load(args.index)
    index.check_catalogue(data)
    model, tokenizer, meta = load_model(start, index=index, for_training=True)
    if s.sampling in ("beam", "dynamic") and s.num_generations > len(index.items):
        raise RereError(
            f"rl.num_generations={s.num_generations} distinct items per prompt, but the catalogue has only "
            f"{len(index.items)}; lower rl.num_generations."
        )
    rows = select_rows(read_split(data / "train.csv"), s.max_train_rows, seed)
    if len(rows) < s.batch_prompts:
        raise RereError(f"{data}/train.csv: {len(rows)} rows, fewer than rl.batch_prompts={s.batch_prompts}.")
    style = meta["prompt_style"]
    item_seqs = prompts.item_token_ids(tokenizer, index.codes, prompts.probe_prompts(index.codes, style, seed))
    resources = {}
    if s.reward == "semantic":
        resources["item_vectors"] = item_vectors(data, config)
    if s.reward == "collaborative":
        resources["scorer"] = collaborative_scorer(args.sasrec)
    valid_rows = select_rows(read_split(data / "valid.csv"), s.eval_rows, seed) if s.eval_every else None
    # With beta > 0 and a full model TRL loads the reference from the policy's config path:
    # that must be the start folder itself.
    model.config._name_or_path = str(start.resolve())
    return RLInputs(
        settings=s,
        index=index,
        model=model,
        tokenizer=tokenizer,
        meta=meta,
        train=training_rows(rows, index, style, seed),
        item_seqs=item_seqs,
        trie=ItemTrie.from_sequences(item_seqs, model.config.get_text_config().vocab_size),
        funcs=reward_funcs(s.reward, **resources),
        valid_rows=valid_rows,
    )


def build_trainer(inp: RLInputs, config: dict, output_dir: Path, callbacks=(), rollout_log: Path | None = None):
    """The ReReTrainer for these inputs (checkpoints under `output_dir`)."""
    import datasets

    s = inp.settings
    targs = grpo_args(
        s, output_dir, config["seed"], max(len(x) for x in inp.item_seqs), bool(inp.meta.get("trust_remote_code"))
    )
    return _trainer_class()(
        model=inp.model,
        reward_funcs=inp.funcs,
        args=targs,
        train_dataset=datasets.Dataset.from_list(inp.train),
        processing_class=inp.tokenizer,
        callbacks=list(callbacks),
        index=inp.index,
        trie=inp.trie,
        item_seqs=inp.item_seqs,
        sampling=s.sampling,
        rollout_log=rollout_log,
    )


def run(args, config) -> int:
    from transformers import set_seed

    from rere import tracking
    from rere.model import save_model

    inp = load_inputs(args, config)
    data, out, start = Path(args.data), Path(args.out), Path(args.model)
    work = out.parent / f"{out.name}.partial"
    work.mkdir(parents=True, exist_ok=True)
    resume = _last_checkpoint(work / CHECKPOINTS)
    set_seed(config["seed"])
    trainer = build_trainer(inp, config, work / CHECKPOINTS, rollout_log=work / ROLLOUT_LOG)
    main_process = trainer.accelerator.is_main_process
    if resume is not None:
        log.info("resuming from %s", resume)
    elif main_process:
        for name in (TRAINER_LOG, ROLLOUT_LOG):
            (work / name).unlink(missing_ok=True)
    # One MLflow run per stage, opened by the main process only.
    track = config if main_process else {**config, "tracking": {**config["tracking"], "mlflow": False}}

    with tracking.stage_run(
        track, stage="rl", dataset=data.name, method=args.variant, index_kind=inp.index.kind
    ) as mlrun:
        for callback in _callbacks(work / TRAINER_LOG, inp, config, mlrun):
            trainer.add_callback(callback)
        started = time.time()
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        summary = {
            "train_loss": result.training_loss,
            "global_step": trainer.state.global_step,
            "wall_s": time.time() - started,
            "train_rows": len(inp.train),
            "processes": trainer.accelerator.num_processes,
        }
        log.info("rl %s done: %s", args.variant, summary)
        mlrun.log_metrics({k: float(v) for k, v in summary.items()})

        trainer.accelerator.wait_for_everyone()
        if main_process:
            policy = trainer.accelerator.unwrap_model(trainer.model)
            policy.eval()
            rl_meta = {**inp.meta, "stage": "rl", "variant": args.variant, "base": str(start)}
            with atomic_path(out) as tmp:
                save_model(policy, inp.tokenizer, tmp, rl_meta, config)
                for name in (TRAINER_LOG, ROLLOUT_LOG):
                    if (work / name).is_file():
                        shutil.copyfile(work / name, tmp / name)
                (tmp / "rl_summary.json").write_text(
                    json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8"
                )
            shutil.rmtree(work, ignore_errors=True)
            mlrun.log_artifact(out / TRAINER_LOG)
        trainer.accelerator.wait_for_everyone()

    if args.eval_out and main_process:
        import argparse

        from rere import evaluate

        ev_args = argparse.Namespace(
            data=str(data), index=args.index, model=str(out), out=args.eval_out, method=args.variant
        )
        evaluate.run(ev_args, config)
    return 0


def _last_checkpoint(folder: Path) -> Path | None:
    """Newest checkpoint-N with trainer_state.json (written last, so complete)."""
    if not folder.is_dir():
        return None
    found = [
        (int(p.name.split("-")[1]), p)
        for p in folder.glob("checkpoint-*")
        if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return max(found)[1] if found else None


# ---------------------------------------------------------------------------------------------
# Benchmark: `rere bench rl`


def trl_default_rollout(
    model, prompt_ids: list[list[int]], g: int, pad_token_id: int, eos_token_id: int, max_new_tokens: int
):
    """What GRPOTrainer does without our rollout: each prompt repeated G times as separate
    rows, one `generate(do_sample=True)` call, unconstrained, temperature 1, no top-k/top-p.
    Returns the completions' token ids (B*G rows, prompt dropped)."""
    import torch
    from transformers import GenerationConfig

    from rere.decoding import left_pad

    repeated = [p for p in prompt_ids for _ in range(g)]  # (B*G) rows, TRL's layout
    ids, mask = left_pad(repeated, pad_token_id, next(model.parameters()).device)
    gen = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)  # (B*G, T + new)
    return out[:, ids.shape[1] :].tolist()


def bench_rl(args, config) -> int:
    """Wall time of one rollout for the same prompts and model: G constrained beams per prompt
    (ReRe, shared prompt prefill) vs TRL's default sampling of G completions (prompt repeated
    G times), plus our constrained sampling. Synthetic catalogue and model from rere.bench."""
    import torch

    from rere.bench import _check_sizes, build_setup
    from rere.decoding import beam_search, sample

    _check_sizes(args)
    seed = int(config["seed"])
    setup = build_setup(args, seed)
    model, trie, prompt_ids, pad, eos = (setup[k] for k in ("model", "trie", "prompts", "pad_id", "eos_id"))
    g, bs = args.beams, args.batch_size
    longest = max(len(s) for s in setup["seqs"])
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    def batches():
        return [prompt_ids[i : i + bs] for i in range(0, len(prompt_ids), bs)]

    # Warm-up: first calls pay for lazy initialisation.
    beam_search(model, prompt_ids[:1], trie, g, pad, bs)
    trl_default_rollout(model, prompt_ids[:1], g, pad, eos, longest)

    timings = {}
    start = time.perf_counter()
    beams = [r for b in batches() for r in beam_search(model, b, trie, g, pad, len(b))]
    timings["beam"] = time.perf_counter() - start
    start = time.perf_counter()
    sampled = [c for b in batches() for c in trl_default_rollout(model, b, g, pad, eos, longest)]
    timings["trl_sampling"] = time.perf_counter() - start
    start = time.perf_counter()
    constrained = [r for b in batches() for r in sample(model, b, trie, g, 1.0, generator, pad, len(b))]
    timings["constrained_sampling"] = time.perf_counter() - start

    valid = {tuple(s) for s in setup["seqs"]}
    sampled_valid = sum(tuple(c[: c.index(eos) + 1] if eos in c else c) in valid for c in sampled)
    figures = {
        "prompts": len(prompt_ids),
        "G": g,
        "prompts_per_call": bs,
        "items": trie.num_items,
        "max_completion_tokens": longest,
        "model": f"qwen2 hidden {args.hidden_size} x {args.layers} layers",
        "torch_threads": torch.get_num_threads(),
        "s_beam_rollout": timings["beam"],
        "s_trl_default_sampling": timings["trl_sampling"],
        "s_constrained_sampling": timings["constrained_sampling"],
        "ratio_trl_sampling_over_beam": timings["trl_sampling"] / timings["beam"],
        "beam_distinct_items_per_prompt": sum(len({i for i, _ in r}) for r in beams) / len(beams),
        "constrained_sampling_distinct_items_per_prompt": sum(len({i for i, _ in r}) for r in constrained)
        / len(constrained),
        "trl_sampling_valid_share": sampled_valid / len(sampled),
    }
    print(
        f"rollout of G={g} completions for {figures['prompts']} prompts ({bs} per call), {figures['model']}, "
        f"{figures['items']} items, completions <= {longest} tokens, {figures['torch_threads']} torch threads:"
    )
    print(f"  rere constrained beam search (shared prefill): {timings['beam']:8.2f} s")
    print(f"  TRL default sampling (prompt repeated G times): {timings['trl_sampling']:8.2f} s")
    print(f"  rere constrained sampling (shared prefill):    {timings['constrained_sampling']:8.2f} s")
    print(f"  ratio TRL sampling / beam rollout: {figures['ratio_trl_sampling_over_beam']:.2f}x")
    print(
        f"  distinct items per prompt: beams {figures['beam_distinct_items_per_prompt']:.1f}, constrained samples "
        f"{figures['constrained_sampling_distinct_items_per_prompt']:.1f}; TRL samples that are catalogue items: "
        f"{100 * figures['trl_sampling_valid_share']:.1f}%"
    )
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0
