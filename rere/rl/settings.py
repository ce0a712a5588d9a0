"""`rl` settings: the config section and one variant, and their mapping to TRL's GRPOConfig."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rere import RereError

PINNED_TRL = "1.16.0"

# `loss` -> (TRL loss_type, importance_sampling_level)
LOSSES = {
    "grpo": ("grpo", "token"),  # per-sequence mean of token terms, then mean over sequences
    "dapo": ("dapo", "token"),  # token-level normalisation over the whole batch
    "gspo": ("grpo", "sequence"),  # one length-normalised ratio per sequence (GSPO paper setup)
    # Rejection-sampling fine-tuning, the ablation of the policy gradient: the completion that
    # names the target gets advantage 1, every other 0 (ReReTrainer), so grpo's loss is the
    # cross-entropy of the target's completion in each group that holds it, divided by G.
    "rft": ("grpo", "token"),
}


@dataclasses.dataclass
class RLSettings:
    """The `rl` config section and one variant. The schema (workflow/schemas/config.schema.yaml)
    describes every field and holds its default: build this from a validated config (`from_config`)."""

    variant: str
    sampling: str
    reward: str
    loss: str
    init_from: str
    num_generations: int
    learning_rate: float
    beta: float
    epochs: float
    max_steps: int
    max_train_rows: int | None
    prompt_pool: str
    batch_prompts: int
    filter_groups: bool
    filter_max_prompts: int
    micro_batch_prompts: int | None
    decode_batch_prompts: int | None
    gradient_checkpointing: bool
    train_dtype: str
    temperature: float
    sync_ref_model: bool
    ref_model_sync_steps: int
    max_grad_norm: float
    warmup_ratio: float
    lr_scheduler: str
    eval_every: int
    eval_rows: int
    save_steps: int
    bf16: bool

    def __post_init__(self):
        if self.sampling not in ("beam", "sample", "dynamic"):
            raise RereError(f"rl variant '{self.variant}': sampling {self.sampling!r} is not beam, sample or dynamic.")
        if self.train_dtype not in ("model", "float32"):
            raise RereError(f"key 'rl.train_dtype' is {self.train_dtype!r}; use model or float32.")
        if self.loss not in LOSSES:
            raise RereError(f"rl variant '{self.variant}': loss {self.loss!r} is not one of {', '.join(LOSSES)}.")
        if self.num_generations < 2:
            raise RereError(
                f"key 'rl.num_generations' is {self.num_generations}: GRPO needs at least 2 completions per prompt "
                "to compare them (a group of one has no advantage). Set it to 2 or more."
            )
        if self.batch_prompts % self.prompts_per_micro_batch:
            raise RereError(
                f"key 'rl.micro_batch_prompts' is {self.micro_batch_prompts}, which does not divide rl.batch_prompts="
                f"{self.batch_prompts}: every micro-batch must hold the same number of whole groups. Set it to a "
                f"divisor of {self.batch_prompts}, or null for no gradient accumulation."
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
    def prompts_per_micro_batch(self) -> int:
        return self.micro_batch_prompts or self.batch_prompts

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches (forward/backward passes) per optimizer step."""
        return self.batch_prompts // self.prompts_per_micro_batch

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
        # Memory knobs that leave the update unchanged: one rollout of batch_prompts x G completions
        # (TRL's generation batch = per-device batch x steps_per_generation) is cut into
        # `accumulation_steps` micro-batches whose gradients add up to one optimizer step. With
        # steps_per_generation == gradient_accumulation_steps every rollout is used once, by the
        # policy that made it (TRL then takes old log-probs = current ones, as with one batch), and
        # TRL scales the loss so the sum over micro-batches is the full batch's loss: grpo divides each
        # micro-batch's mean by the number of micro-batches, dapo divides by the rollout's token count.
        per_device_train_batch_size=s.prompts_per_micro_batch * s.num_generations,
        gradient_accumulation_steps=s.accumulation_steps,
        steps_per_generation=s.accumulation_steps,
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
        activation_checkpointing=s.gradient_checkpointing,  # recompute layer activations in backward
        logging_steps=1,
        save_strategy="steps" if s.save_steps > 0 else "no",
        save_steps=s.save_steps if s.save_steps > 0 else 500,
        save_total_limit=2,  # the newest, and the one before in case the newest was cut short
        report_to="none",
        dataloader_num_workers=0,
        log_completions=False,
        trust_remote_code=trust_remote_code,
        # On a machine without CUDA, several processes (torchrun) train on CPU with gloo.
        use_cpu=not torch.cuda.is_available(),
    )
