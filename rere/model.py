"""`rere model`: the base model that SFT starts from, saved as an ordinary HF folder.

- `model.init: scratch` (offline default): a byte-level BPE tokenizer trained on the
  dataset's own prompts (train rows) and item completions, and a small Qwen2-architecture
  causal LM with `model.scratch` sizes and a seeded initialisation.
- `model.init: pretrained`: any Hugging Face causal LM by name or local path
  (`trust_remote_code` off unless the config turns it on).

Whether code shipped in a model folder may run is the user's decision only
(`model.trust_remote_code`, e.g. `--set model.trust_remote_code=true`): `load_model` refuses
a folder whose rere.json or config.json/tokenizer_config.json `auto_map` asks for it otherwise.

With a semantic-ID index the SID tokens are added to the tokenizer (and the embedding rows of
a pretrained model start at the mean of the existing rows). Every model folder holds
`rere.json` with the fingerprint of the index it was built for; `load_model` refuses a
folder whose fingerprint differs from the index in use, so a model is never evaluated
against a catalogue it was not trained on.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from rere import RereError
from rere.index import ItemIndex
from rere.io import atomic_path, read_json, read_split, save_resolved_config, write_json
from rere.machine import describe
from rere.prompts import catalogue_token_ids, completion_text, row_prompt

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
SID_TOKEN = re.compile(r"<[a-z]+_\d+>")  # sid (<a_12>) and atomic (<item_7>) tokens


@dataclass
class ScratchConfig:
    """The `model.scratch` section; its descriptions and defaults are in the schema."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise RereError(
                f"key 'model.scratch.hidden_size': {self.hidden_size} is not divisible by num_heads={self.num_heads}."
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise RereError(
                f"keys 'model.scratch.hidden_size'/'num_heads': head size {self.hidden_size // self.num_heads} "
                "must be even (rotary embeddings rotate pairs of dimensions)."
            )
        if self.num_heads % self.num_kv_heads:
            raise RereError(
                f"key 'model.scratch.num_kv_heads': num_heads={self.num_heads} is not a multiple of {self.num_kv_heads}."
            )


def count_parameters(model) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- scratch


def training_texts(data: str | Path, index: ItemIndex, style: str, seed: int) -> Iterator[str]:
    """The tokenizer's corpus: a prompt per train row and each item's completion.

    SID tokens are removed: they are added to the tokenizer whole, after training.
    """
    code_of = index.code_of
    for row in read_split(Path(data) / "train.csv"):
        text = row_prompt(row, code_of, style, seed) + completion_text(code_of[row["item_id"]])
        yield SID_TOKEN.sub(" ", text)
    for code in index.codes:
        yield SID_TOKEN.sub(" ", completion_text(code))


def train_tokenizer(texts: Iterator[str], vocab_size: int, max_length: int, new_tokens: Sequence[str] = ()):
    """A byte-level BPE tokenizer wrapped for transformers, left padding; deterministic.

    The pipeline is exactly Qwen2's (NFC, Qwen2's split regex, byte-level): transformers'
    AutoTokenizer loads any `qwen2` model folder as a Qwen2Tokenizer, which rebuilds that
    pipeline around the saved vocabulary, so a tokenizer trained any other way would split
    text differently once reloaded.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        model_max_length=max_length,
    )
    if new_tokens:
        tokenizer.add_tokens(list(new_tokens))
    return tokenizer


def build_scratch(data: str | Path, index: ItemIndex, config: dict):
    """(model, tokenizer) built from `model.scratch` sizes and trained on the dataset's text."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    sizes = ScratchConfig(**config["model"]["scratch"])
    log.info("training a byte-level BPE tokenizer (vocab %d) on %s", sizes.vocab_size, data)
    texts = training_texts(data, index, config["model"]["prompt"], config["seed"])
    tokenizer = train_tokenizer(texts, sizes.vocab_size, sizes.max_position_embeddings, index.new_tokens)
    model_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_layers,
        num_attention_heads=sizes.num_heads,
        num_key_value_heads=sizes.num_kv_heads,
        max_position_embeddings=sizes.max_position_embeddings,
        tie_word_embeddings=True,  # at this size the embeddings are most of the model
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(config["seed"])
    model = Qwen2ForCausalLM(model_config)
    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model, tokenizer


# ---------------------------------------------------------------------------- pretrained


def _dtype(name: str):
    import torch

    if name == "auto":
        # On CPU, half-precision weights are slow and lossy; keep the checkpoint's dtype on GPU.
        return "auto" if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def load_pretrained(model_cfg: dict, index: ItemIndex):
    """(model, tokenizer) from `model.name_or_path`, with SID tokens added for a sid index."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    name = model_cfg["name_or_path"]
    trust = bool(model_cfg["trust_remote_code"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust)
        model = AutoModelForCausalLM.from_pretrained(
            name, trust_remote_code=trust, dtype=_dtype(model_cfg["torch_dtype"])
        )
    except (OSError, ValueError, KeyError) as exc:
        if "trust_remote_code" in str(exc) and not trust:
            raise RereError(
                f"model.name_or_path {name!r} ships its own model code, which is not run by default; "
                "set model.trust_remote_code=true only if you trust its author."
            ) from None
        raise RereError(
            f"model.name_or_path {name!r} could not be loaded as a causal LM ({type(exc).__name__}: {exc}). "
            "Check the name or the local folder (config.json, weights, tokenizer files) and network access."
        ) from None
    if tokenizer.eos_token_id is None:
        raise RereError(f"model.name_or_path {name!r}: the tokenizer has no EOS token; completions must end with one.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    old_len = len(tokenizer)
    if index.new_tokens:
        tokenizer.add_tokens(list(index.new_tokens))
        _init_new_rows(model, old_len, len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config = GenerationConfig(
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=model.config.bos_token_id,
    )
    return model, tokenizer


def _init_new_rows(model, old_len: int, new_len: int) -> None:
    """Grow the embeddings to `new_len` rows if needed; rows [old_len, new_len) := mean of rows [0, old_len).

    A pretrained matrix often has spare rows beyond the tokenizer; those are untrained, so
    the new tokens' rows are set whether or not the matrix had to grow.
    """
    import torch

    if model.get_input_embeddings().weight.shape[0] < new_len:
        model.resize_token_embeddings(new_len, mean_resizing=False)
    with torch.no_grad():
        matrices = [model.get_input_embeddings().weight]
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != matrices[0].data_ptr():
            matrices.append(out.weight)
        for w in matrices:  # (V, H)
            w[old_len:new_len] = w[:old_len].float().mean(dim=0).to(w.dtype)


# ---------------------------------------------------------------------------- folders


def save_model(model, tokenizer, folder: str | Path, meta: dict, config: dict, keep: Sequence[str] = ()) -> None:
    """Write model + tokenizer (`save_pretrained`), rere.json and config.yaml to `folder`, atomically.

    `keep`: names of entries already in `folder` (e.g. "checkpoints", "trainer_log.jsonl")
    to carry over into the new folder; everything else there is replaced.
    """
    folder = Path(folder)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "rere.json", {**meta, "machine": describe()})  # where it was trained (rere.machine)
        save_resolved_config(tmp, config)
        for name in keep:
            if (folder / name).exists() and not (tmp / name).exists():
                shutil.move(str(folder / name), str(tmp / name))


# Files of a model folder that transformers parses as JSON (a broken one is named, not a traceback).
JSON_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
DAMAGED = "the model folder is damaged: rebuild it (`rere model`, `rere sft` or `rere rl`) or restore it from a copy."


def remote_code_requests(folder: Path, meta: dict) -> list[str]:
    """The files of `folder` that ask to run Python code shipped in the folder (empty: none do).

    A folder asks through rere.json's `trust_remote_code` or an `auto_map` (class name ->
    module in the folder) in config.json or tokenizer_config.json; transformers would import
    that module when it loads the folder with trust_remote_code on.
    """
    asks = []
    if meta.get("trust_remote_code"):
        asks.append(f"{folder / 'rere.json'} (trust_remote_code: true)")
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        auto_map = _folder_json(path).get("auto_map") if path.is_file() else None
        if auto_map:
            asks.append(f"{path} (auto_map: {json.dumps(auto_map)[:120]})")
    return asks


def _folder_json(path: Path) -> dict:
    try:
        data = read_json(path)
    except RereError as exc:
        raise RereError(f"{exc} {DAMAGED}") from None
    except UnicodeDecodeError:
        raise RereError(f"{path}: not UTF-8. {DAMAGED}") from None
    if not isinstance(data, dict):
        raise RereError(f"{path}: expected a JSON object, got {type(data).__name__}. {DAMAGED}")
    return data


def check_folder_files(folder: Path) -> None:
    """Every JSON file transformers will parse, and every safetensors file, must be readable
    (a truncated download or a hand edit otherwise fails deep inside transformers)."""
    from safetensors import SafetensorError, safe_open

    for name in JSON_FILES:
        if (folder / name).is_file():
            _folder_json(folder / name)
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise RereError(f"{path} is truncated or not a safetensors file ({exc}); {DAMAGED}") from None


def _load_tokenizer(folder: Path, trust: bool):
    """The tokenizer as saved. AutoTokenizer would turn a generic (TokenizersBackend) tokenizer
    in a `qwen2` folder into a Qwen2Tokenizer, which rebuilds the pipeline around the vocabulary;
    a generic tokenizer is loaded from its tokenizer.json as it is."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok_config = folder / "tokenizer_config.json"
    saved_class = _folder_json(tok_config).get("tokenizer_class") if tok_config.is_file() else None
    try:
        if saved_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
    except Exception as exc:  # the tokenizers library raises plain Exception for a malformed tokenizer.json
        raise RereError(
            f"{folder}: the tokenizer (tokenizer.json, tokenizer_config.json) could not be loaded "
            f"({type(exc).__name__}: {str(exc)[:200]}); {DAMAGED}"
        ) from None


def load_model(
    folder: str | Path,
    index: ItemIndex | None = None,
    device: str = "cpu",
    for_training: bool = False,
    trust_remote_code: bool = False,
):
    """(model, tokenizer, meta) from a folder written by `save_model`.

    Raises RereError when the folder is missing, is not a rere model folder, was built for
    another index (fingerprint), has a damaged file (named), or asks to run its own code
    (`remote_code_requests`) while `trust_remote_code` is off. Only the caller decides
    whether code shipped in a folder may run, from the user's `model.trust_remote_code`;
    the folder itself never does. The tokenizer is left-padding with a pad token.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if not folder.is_dir():
        raise RereError(f"model folder {folder} does not exist; run `rere model` (base) or `rere sft` first.")
    if not (folder / "rere.json").is_file():
        raise RereError(
            f"{folder} has no rere.json, so it is not a rere model folder; run `rere model` or `rere sft` first."
        )
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise RereError(
            f"{folder} has no model weights ({', '.join(WEIGHT_FILES)}); run `rere model` or `rere sft` again."
        )
    meta = _folder_json(folder / "rere.json")
    if index is not None and meta.get("index_fingerprint") != index.fingerprint:
        raise RereError(
            f"{folder}: the catalogue does not match the index the model was trained with "
            f"(model: {meta.get('index_kind')} index {str(meta.get('index_fingerprint'))[:12]}, "
            f"now: {index.kind} index {index.fingerprint[:12]}); rebuild the model (rere model, sft, rl) "
            "from the current index, or point --index at the one it was built with."
        )
    asks = remote_code_requests(folder, meta)
    if asks and not trust_remote_code:
        raise RereError(
            f"{asks[0]} asks to run Python code shipped in {folder}, and your config does not allow it "
            "(model.trust_remote_code is false); nothing was run. If you trust whoever made this folder, "
            "rerun with --set model.trust_remote_code=true (or set it in your config file)."
        )
    check_folder_files(folder)
    trust = bool(trust_remote_code)
    tokenizer = _load_tokenizer(folder, trust)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust, dtype="auto")
    except (OSError, ValueError, KeyError, RuntimeError, EOFError) as exc:
        raise RereError(
            f"{folder}: the model could not be loaded ({type(exc).__name__}: {str(exc)[:200]}); {DAMAGED}"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise RereError(
            f"{folder}: the tokenizer has more tokens than the model's embeddings; the folder is inconsistent."
        )
    if index is not None and index.new_tokens:
        unk = tokenizer.unk_token_id
        missing = [
            t
            for t, i in zip(index.new_tokens, tokenizer.convert_tokens_to_ids(index.new_tokens), strict=True)
            if i is None or i == unk
        ]
        if missing:
            raise RereError(
                f"{folder}: the tokenizer lacks SID tokens such as {missing[:3]}; rebuild it with `rere model`."
            )
    model.to(device)
    model.train(for_training)
    return model, tokenizer, meta


# ---------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rere.cli import add_stage_paths

    add_stage_paths(parser, model=None, out="output model folder, e.g. models/ml100k/base")


def run(args: argparse.Namespace, config: dict) -> int:
    index = ItemIndex.load(args.index)
    index.check_catalogue(args.data)
    model_cfg = config["model"]
    if model_cfg["init"] == "scratch":
        model, tokenizer = build_scratch(args.data, index, config)
        base = "scratch"
    else:
        model, tokenizer = load_pretrained(model_cfg, index)
        base = model_cfg["name_or_path"]
    # Fail here, not three stages later, if this tokenizer cannot write the items reliably.
    style = model_cfg["prompt"]
    ids = catalogue_token_ids(tokenizer, index, style, config["seed"])
    lengths = sorted(len(x) for x in ids)
    meta = {
        "index_fingerprint": index.fingerprint,
        "index_kind": index.kind,
        "prompt_style": style,
        "dataset": Path(args.data).name,
        "stage": "base",
        "base": base,
        "trust_remote_code": bool(model_cfg["trust_remote_code"]) if base != "scratch" else False,
    }
    save_model(model, tokenizer, args.out, meta, config)
    log.info(
        "wrote %s: %s model, %d parameters, vocabulary %d; item completions %d-%d tokens (median %d, EOS included)",
        args.out,
        base,
        count_parameters(model),
        len(tokenizer),
        lengths[0],
        lengths[-1],
        lengths[len(lengths) // 2],
    )
    return 0
