"""Supervised fine-tuning: learn to write the next item's code after a user's history.

`rere sft --data data/D --index index/D --model models/D/base --out models/D/sft`

Each train row becomes one prompt-completion pair: the prompt lists the history items' codes
(`rere.prompts.build_prompt`, with the row's own seeded RNG), the completion is the target's
code and a newline. TRL's `SFTTrainer` appends the EOS token and puts the loss on the
completion only; before training we check, row by row, that the tokens it trains on are
exactly the item's sequence in the decoding trie (`rere.prompts.item_token_ids`), so the
model learns precisely what constrained beam search will later let it write (EOS once).

Folder layout (the Snakemake rule's output is the folder `out`):

    out.partial/            while training: checkpoints/checkpoint-N (every eval_steps),
                            trainer_log.jsonl. An interrupted run leaves only this folder;
                            rerunning `rere sft` resumes from its last complete checkpoint.
    out/                    appears only when training is over, renamed into place in one
                            step: the best model (LoRA merged), tokenizer, rere.json
                            (stage "sft"), config.yaml, trainer_log.jsonl, checkpoints/.

Rerunning on a finished `out` with a larger `sft.max_steps` moves its checkpoints back to
`out.partial/` and continues from the last one; `out` is replaced when the new run ends.

`sft_summary.json`'s `train_loss` is the mean loss per step over all steps of the model, the
steps trained before a resume included (`overall_train_loss`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from rere import RereError
from rere.checkpoints import (
    CHECKPOINTS,
    TRAINER_LOG,
    check_or_clear,
    drop_incomplete,
    file_digest,
    folder_digest,
    jsonl_log_callback,
    last_complete_checkpoint,
    partial_dir,
    read_signature,
    step_of,
    truncate_log,
    write_signature,
)
from rere.io import read_split, save_resolved_config

log = logging.getLogger(__name__)

INPUTS = "sft_inputs.json"  # inputs_signature of the run that made the checkpoints


def add_arguments(parser) -> None:
    from rere.cli import add_stage_paths

    add_stage_paths(
        parser,
        model="base model folder from `rere model`",
        out="output model folder (checkpoints go to OUT.partial/ until done)",
    )


# ---------------------------------------------------------------------------------------------
# Data


def sequence_rows(rows: list[dict], stride: int) -> list[dict]:
    """`sft.targets: all`: every `stride`-th train row of each user, counting back from the
    user's last row, in file order. A row's history plus its target is a window of the
    user's sequence; with `stride` = the history length consecutive windows share one item,
    so every item but a user's first is a target exactly once.

    >>> rows = [{"user_id": u, "n": n} for u, n in [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2)]]
    >>> [(r["user_id"], r["n"]) for r in sequence_rows(rows, 2)]
    [('a', 1), ('a', 3), ('b', 2)]
    """
    by_user: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_user.setdefault(row["user_id"], []).append(i)
    keep = {i for idx in by_user.values() for i in idx[::-1][::stride]}
    return [row for i, row in enumerate(rows) if i in keep]


def row_items(row: dict, targets: str) -> list[int]:
    """The item ids a row trains, in order: its target, or (targets all) its history after the
    first item and then its target."""
    return [*row["history_item_id"][1:], row["item_id"]] if targets == "all" else [row["item_id"]]


def prompt_completion_rows(
    rows: list[dict], index, style: str, seed: int, split: str, targets: str = "last", eos: str = ""
) -> list[dict]:
    """One {"prompt", "completion"} per row; the prompt is `rere.prompts.row_prompt`, the same
    in every stage. With targets "all" (prompt style sequence) the prompt is the history's
    first item and the completion every later item, then the target (each but the target
    followed by `eos`, the EOS token text; TRL appends the target's EOS). Items unknown to the
    index are a RereError naming the split file's line.
    """
    from rere import prompts

    codes = index.code_of
    out = []
    for row in rows:
        missing = [i for i in [*row["history_item_id"], row["item_id"]] if i not in codes]
        if missing:
            raise RereError(
                f"{split}.csv line {row.get('_line', '?')}: item id(s) {missing} are not in the index "
                f"({len(codes)} items); rebuild the index from this dataset (`rere index`)."
            )
        if targets == "all":
            first = [codes[row["history_item_id"][0]]]
            prompt = prompts.build_prompt(first, style, prompts.row_rng(seed, "all"), eos)
        else:
            prompt = prompts.row_prompt(row, codes, style, seed, eos)
        items = [prompts.completion_text(codes[i]) for i in row_items(row, targets)]
        completion = eos.join(items)
        out.append({"prompt": prompt, "completion": completion})
    return out


def check_training_labels(
    dataset, target_positions: list[list[int]], item_seqs: list[list[int]], split: str, eos_between: bool = False
) -> None:
    """Every row's trained tokens (labels != -100) must equal its targets' trie sequences, one
    after the other (`eos_between`: each with its EOS, as the sequence style writes them;
    otherwise the EOS only after the last).

    This is where a doubled or missing EOS, a prompt/completion boundary that merges tokens,
    or a truncated completion would show up; each would train the model on sequences that
    constrained decoding can never produce.
    """
    for i, (labels, positions) in enumerate(zip(dataset["labels"], target_positions, strict=True)):
        trained = [t for t in labels if t != -100]
        cut = None if eos_between else -1
        expected = [t for p in positions[:-1] for t in item_seqs[p][:cut]] + item_seqs[positions[-1]]
        if trained != expected:
            raise RereError(
                f"{split} row {i}: SFT would train on token ids {trained} but the decoding trie has "
                f"{expected} for these items. The tokenizer does not split prompt and completion "
                "the same way in training and decoding (or adds its own EOS); use the compact prompt "
                "or another tokenizer."
            )


# ---------------------------------------------------------------------------------------------
# Checkpoints and the working folder


# Keys that may change between a run and its resumption (e.g. a longer run on the same folder).
RESUMABLE_KEYS = ("max_steps", "epochs", "patience", "logging_steps")


def inputs_signature(config: dict, data: Path, index, base: Path) -> dict:
    """What a checkpoint depends on: resuming is refused when any of it changed (a rebuilt base
    model, another index or train split, another learning rate...)."""
    sft = {k: v for k, v in config["sft"].items() if k not in RESUMABLE_KEYS}
    return {
        "index": index.fingerprint,
        "base": folder_digest(base),
        "train": file_digest(data / "train.csv"),
        "seed": config["seed"],
        "sft": sft,
    }


def _prepare_work_dir(out: Path, signature: dict) -> tuple[Path, Path | None]:
    """Return (work dir, checkpoint to resume from or None)."""
    work = partial_dir(out)
    ckpt_dir = work / CHECKPOINTS
    # SFT is cheap to redo and Snakemake reruns it when its inputs change: start over.
    check_or_clear(work, INPUTS, signature, refuse=False)
    finished = out / CHECKPOINTS
    if (
        not work.exists()
        and last_complete_checkpoint(finished) is not None
        and read_signature(out / INPUTS) == signature
    ):
        # A finished run on the same inputs: continue from its checkpoints (e.g. a larger max_steps).
        ckpt_dir.parent.mkdir(parents=True)
        os.replace(finished, ckpt_dir)
        if (out / TRAINER_LOG).is_file():
            shutil.copyfile(out / TRAINER_LOG, work / TRAINER_LOG)
    work.mkdir(parents=True, exist_ok=True)
    write_signature(work / INPUTS, signature)
    shutil.rmtree(work / "final", ignore_errors=True)  # a publish cut short; out/ is still intact
    drop_incomplete(ckpt_dir)
    resume = last_complete_checkpoint(ckpt_dir)
    truncate_log(work / TRAINER_LOG, step_of(resume) if resume else 0)
    return work, resume


def overall_train_loss(log_path: Path, resumed_at: int, run_loss: float, global_step: int) -> float:
    """Mean train loss per optimizer step over every step of the run, resumed parts included.

    Trainer's `training_loss` is the mean over the steps of this call only, (R, G] for a run
    resumed at step R. The steps before come from trainer_log.jsonl, where each `loss` record
    at step s is the mean over the steps since the previous record, so it weighs s - s_prev:

        train_loss = (sum_{records s <= R} loss_s * (s - s_prev) + run_loss * (G - R)) / (s_last + G - R)

    with s_last the last record at or before R. It is exact when the checkpoint step R is a
    multiple of sft.logging_steps (the default eval_steps/logging_steps are); otherwise the
    steps between s_last and R, whose losses were never logged, are left out.
    """
    weighted, steps, previous = 0.0, 0, 0
    if resumed_at and log_path.is_file():
        for line in log_path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line) if line.strip() else {}
            step = record.get("step", 0)
            if "loss" in record and previous < step <= resumed_at:
                weighted += record["loss"] * (step - previous)
                steps += step - previous
                previous = step
    new_steps = global_step - resumed_at
    if steps + new_steps == 0:
        return run_loss
    return (weighted + run_loss * new_steps) / (steps + new_steps)


def _publish(model, tokenizer, work: Path, out: Path, meta: dict, config: dict, summary: dict) -> None:
    """Make `out` appear complete in one rename, then move the checkpoints into it.

    If this is cut short after the rename, OUT.partial still holds the checkpoints; the next
    run resumes at the final step, trains nothing and publishes again.
    """
    from rere.model import save_model

    staged = work / "final"
    save_model(model, tokenizer, staged, meta, config)
    (staged / "sft_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if (work / TRAINER_LOG).is_file():
        shutil.copyfile(work / TRAINER_LOG, staged / TRAINER_LOG)
    shutil.copyfile(work / INPUTS, staged / INPUTS)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staged, out)
    os.replace(work / CHECKPOINTS, out / CHECKPOINTS)
    shutil.rmtree(work, ignore_errors=True)


def _make_callbacks(work: Path, config: dict):
    from transformers import TrainerCallback

    class ConfigIntoCheckpoint(TrainerCallback):
        """Each checkpoint carries the resolved config that produced it."""

        def on_save(self, args, state, control, **kwargs):
            ckpt = work / CHECKPOINTS / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                save_resolved_config(ckpt, config, name="rere_config.yaml")

    # trainer_log.jsonl: train loss, lr, grad norm, eval loss, with their step
    return [jsonl_log_callback(work / TRAINER_LOG), ConfigIntoCheckpoint()]


# ---------------------------------------------------------------------------------------------
# Model set-up


def trainable_token_ids(tokenizer, index) -> list[int]:
    """Token ids of the SID code tokens (empty for a title index)."""
    if not index.new_tokens:
        return []
    ids = tokenizer.convert_tokens_to_ids(list(index.new_tokens))
    unknown = [t for t, i in zip(index.new_tokens, ids, strict=True) if i is None or i == tokenizer.unk_token_id]
    if unknown:
        raise RereError(
            f"the model's tokenizer lacks {len(unknown)} SID token(s) of the index (e.g. {unknown[:3]}); "
            "rebuild the base model with this index (`rere model --index ...`)."
        )
    return list(ids)


def lora_config(model, lora: dict, new_token_ids: list[int]):
    """LoRA adapters on `target_modules`; with a SID index the input embedding and the output
    layer are trained in full besides (peft `modules_to_save`), so the new code tokens learn.

    peft's finer `trainable_token_indices` (only the new rows) does not work here: TRL 1.16's
    SFTTrainer computes the loss with a fused LM head that reads `lm_head.weight` and
    `lm_head.bias`, and peft's TrainableTokensWrapper has no `bias`. With tied input/output
    embeddings, `ensure_weight_tying` keeps the trained copy tied to the output layer.
    """
    from peft import LoraConfig

    kwargs = {}
    if new_token_ids:
        names = {m: n.split(".")[-1] for n, m in model.named_modules()}
        kwargs["modules_to_save"] = [names[model.get_input_embeddings()]]
        if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
            kwargs["ensure_weight_tying"] = True
        else:
            kwargs["modules_to_save"].append(names[model.get_output_embeddings()])
    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        task_type="CAUSAL_LM",
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------
# The stage


def run(args, config) -> int:
    import datasets
    from transformers import EarlyStoppingCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from rere import prompts, tracking
    from rere.index import ItemIndex
    from rere.metrics import select_rows
    from rere.model import load_model

    sft = config["sft"]
    seed = config["seed"]
    data, out = Path(args.data), Path(args.out)
    dataset_name = data.name

    # Everything that can be wrong with the inputs is checked before any training.
    index = ItemIndex.load(args.index)
    index.check_catalogue(data)
    model, tokenizer, meta = load_model(
        args.model, index=index, for_training=True, trust_remote_code=config["model"]["trust_remote_code"]
    )
    style = meta["prompt_style"]
    targets = sft["targets"]
    if targets == "all" and style != "sequence":
        raise RereError(
            f"key 'sft.targets' is all but {args.model} was built with prompt style {style!r}; every item of a "
            "history can be a target only when items are written as completions (model.prompt: sequence). "
            "Rebuild the base model with model.prompt=sequence or set sft.targets=last."
        )
    train_rows = read_split(data / "train.csv")
    if targets == "all":
        stride = sft["sequence_stride"] or max((len(r["history_item_id"]) for r in train_rows), default=1)
        before = len(train_rows)
        train_rows = sequence_rows(train_rows, stride)
        log.info("sft.targets all: %d of %d train rows (every %d-th per user)", len(train_rows), before, stride)
    train_rows = select_rows(train_rows, sft["max_train_rows"], seed)
    valid_rows = select_rows(read_split(data / "valid.csv"), sft["max_eval_rows"], seed)
    if not train_rows or not valid_rows:
        raise RereError(f"{data}: the train or valid split is empty; nothing to fine-tune on.")
    eos = prompts.eos_text(tokenizer, style)
    train_pc = prompt_completion_rows(train_rows, index, style, seed, "train", targets, eos)
    valid_pc = prompt_completion_rows(valid_rows, index, style, seed, "valid", eos=eos)
    new_ids = trainable_token_ids(tokenizer, index)
    item_seqs = prompts.catalogue_token_ids(tokenizer, index, style, seed)
    position = {item_id: p for p, item_id in enumerate(index.item_ids)}

    work, resume = _prepare_work_dir(out, inputs_signature(config, data, index, Path(args.model)))
    if resume:
        log.info("resuming from %s", resume)
    set_seed(seed)

    peft_config = None
    if sft["lora"]["enabled"]:
        peft_config = lora_config(model, sft["lora"], new_ids)
    else:
        model.requires_grad_(True)  # full fine-tuning, new SID embedding rows and output layer included

    steps_per_eval = sft["eval_steps"]
    targs = SFTConfig(
        output_dir=str(work / CHECKPOINTS),
        seed=seed,
        data_seed=seed,
        learning_rate=sft["learning_rate"],
        per_device_train_batch_size=sft["batch_size"],
        per_device_eval_batch_size=sft["batch_size"],
        gradient_accumulation_steps=sft["grad_accum"],
        num_train_epochs=sft["epochs"],
        max_steps=sft["max_steps"],
        warmup_steps=min(sft["warmup_ratio"], 0.999),  # a float < 1 is a share of the steps (transformers 5)
        lr_scheduler_type=sft["lr_scheduler"],
        weight_decay=sft["weight_decay"],
        bf16=sft["bf16"],
        activation_checkpointing=False,
        dataloader_pin_memory=False,
        logging_steps=sft["logging_steps"],
        eval_strategy="steps",
        eval_steps=steps_per_eval,
        save_strategy="steps",
        save_steps=steps_per_eval,
        save_total_limit=2,  # the best checkpoint is always kept besides the newest
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to="none",
        completion_only_loss=True,
        max_length=None,  # nothing is truncated; lengths are checked below
        dataset_num_proc=None,
        dataloader_num_workers=0,
        disable_tqdm=getattr(args, "quiet", False),
    )

    with tracking.stage_run(config, stage="sft", dataset=dataset_name, method=out.name, index_kind=index.kind) as mlrun:
        trainer = SFTTrainer(
            model=model,
            args=targs,
            train_dataset=datasets.Dataset.from_list(train_pc),
            eval_dataset=datasets.Dataset.from_list(valid_pc),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[
                EarlyStoppingCallback(early_stopping_patience=sft["patience"]),
                *_make_callbacks(work, config),
                mlrun.callback(),
            ],
        )
        train_targets = [[position[i] for i in row_items(r, targets)] for r in train_rows]
        check_training_labels(trainer.train_dataset, train_targets, item_seqs, "train", eos_between=bool(eos))
        check_training_labels(trainer.eval_dataset, [[position[r["item_id"]]] for r in valid_rows], item_seqs, "valid")
        longest = max(len(x) for x in trainer.train_dataset["input_ids"])
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if limit is not None and longest > limit:
            raise RereError(
                f"the longest train sequence has {longest} tokens but the model takes {limit}; "
                "shorten the histories (datasets.*.max_history) or use a model with longer context."
            )

        started = time.time()
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        wall = time.time() - started

        best = trainer.state.best_metric
        summary = {
            "train_loss": overall_train_loss(
                work / TRAINER_LOG, step_of(resume) if resume else 0, result.training_loss, trainer.state.global_step
            ),
            "best_eval_loss": best,
            "global_step": trainer.state.global_step,
            "best_checkpoint_step": trainer.state.best_global_step,
            "train_rows": len(train_rows),
            "eval_rows": len(valid_rows),
            "wall_s": wall,
        }
        log.info("sft done: %s", summary)
        mlrun.log_metrics({k: float(v) for k, v in summary.items() if v is not None})

        final = trainer.model
        if peft_config is not None:
            final = final.merge_and_unload()
        final.eval()
        _publish(final, tokenizer, work, out, {**meta, "stage": "sft", "base": str(args.model)}, config, summary)
        mlrun.log_artifact(out / TRAINER_LOG)
    return 0
