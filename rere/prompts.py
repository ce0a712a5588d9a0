"""Prompts and the tokens of each item's completion, as the model sees them after a prompt.

A sample is `prompt + completion`: the prompt lists the user's history as item codes (quoted
titles or semantic IDs, see rere.index) and ends with a newline; the completion is the next
item's code, a newline, then the EOS token. Two prompt styles:

- `instruction`: the paper's prompt. An instruction drawn with a seeded RNG from
  INSTRUCTIONS, the history, and an Alpaca-style response header.
- `compact`: `History: <codes>\\nNext:\\n`, short enough for the small scratch models.
- `sequence`: the history items written exactly as completions, one after the other
  (`code\\n` and the EOS token each), nothing else. A user's train sequence is then one text in which every
  item follows its own history the way a completion follows a prompt, so SFT can put the
  loss on every item at once (`sft.targets: all`, as SASRec trains every position).

The catalogue trie (rere.decoding) must hold the tokens the model actually produces *after*
a prompt, not the tokens of the completion on its own: BPE merges can differ at a text
boundary (the reference code hard-codes "skip 3 prefix tokens, 4 for GPT-2", which breaks
silently on any other tokenizer). `item_token_ids` tokenizes each completion in context and
checks that the prompt's tokens are unchanged by what follows them.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from rere import RereError

STYLES = ("compact", "instruction", "sequence")

# The paper's instruction, reworded a few ways; one is drawn per row (row_rng), so a row
# gets the same wording in every stage.
INSTRUCTIONS = (
    "Given a list of items the user has interacted with in chronological order, "
    "recommend the next item the user is most likely to interact with.",
    "Here are the items a user has interacted with, oldest first. Predict the item the user will interact with next.",
    "The user's interaction history is listed below in chronological order. "
    "Recommend one new item that the user will like next.",
    "Based on the user's past interactions, listed from earliest to latest, suggest the next item for this user.",
    "Below are the items this user engaged with, in order. "
    "Which item will the user engage with next? Answer with one item.",
)

INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{history}\n\n### Response:\n"
COMPACT_TEMPLATE = "History: {history}\nNext:\n"


def row_rng(seed: int, row_key: str | int) -> random.Random:
    """An RNG that depends only on (seed, row_key), the same in every process and stage.

    Python's `hash()` is salted per process, so the key is hashed with sha256 instead.

    >>> row_rng(42, "train:7").random() == row_rng(42, "train:7").random()
    True
    """
    digest = hashlib.sha256(f"{seed}\x1f{row_key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def eos_text(tokenizer, style: str) -> str:
    """What ends a history item in the prompt: the tokenizer's EOS token for the sequence style
    (a history item is then exactly a completion, EOS included), nothing for the others."""
    return (tokenizer.eos_token or "") if style == "sequence" else ""


def build_prompt(history_codes: Sequence[str], style: str, rng: random.Random, eos: str = "") -> str:
    """The prompt for a history of item codes (oldest first); it ends with a newline (sequence
    style: with `eos`, the tokenizer's EOS token text, see `eos_text`).

    `rng` chooses the instruction variant (style `instruction`); `compact` ignores it.

    >>> build_prompt(['"A"', '"B"'], "compact", random.Random(0))
    'History: "A", "B"\\nNext:\\n'
    """
    if style == "sequence":
        return "".join(completion_text(c) + eos for c in history_codes)
    history = ", ".join(history_codes)
    if style == "compact":
        return COMPACT_TEMPLATE.format(history=history)
    if style == "instruction":
        return INSTRUCTION_TEMPLATE.format(instruction=rng.choice(INSTRUCTIONS), history=history)
    raise RereError(f"prompt style {style!r} is unknown; set model.prompt to one of {', '.join(STYLES)}.")


def row_key(row: dict) -> str:
    """A split row's identity for `row_rng`: user, target and time, not its line number,
    so a subsampled or reordered split still gives each sample the same prompt."""
    return f"{row['user_id']}:{row['item_id']}:{row['timestamp']}"


def row_prompt(row: dict, code_of: dict[int, str], style: str, seed: int, eos: str = "") -> str:
    """The prompt for a split row (rere.io.read_split), the same in every stage.

    `code_of`: item_id -> code (`ItemIndex.code_of`).
    """
    try:
        history = [code_of[i] for i in row["history_item_id"]]
    except KeyError as exc:
        raise RereError(
            f"row at line {row.get('_line', '?')}: history item {exc.args[0]} is not in the index; "
            "rebuild the index from this data folder with `rere index`."
        ) from None
    return build_prompt(history, style, row_rng(seed, row_key(row)), eos)


def completion_text(code: str) -> str:
    """What the model writes for an item, before EOS (added as a token id, never as text)."""
    return code + "\n"


def probe_prompts(codes: Sequence[str], style: str, seed: int, eos: str = "") -> list[str]:
    """A few realistic prompts to tokenize completions after (see `item_token_ids`).

    Histories of 1, 3 and 10 items drawn from `codes`; for the instruction style one prompt
    per instruction variant, so every header the model is trained on is checked.
    """
    if not codes:
        raise RereError("the index has no items; rebuild it with `rere index`.")
    rng = random.Random(seed)
    n = len(INSTRUCTIONS) if style == "instruction" else 3
    prompts = []
    for i in range(n):
        length = (1, 3, 10)[i % 3]
        history = [codes[rng.randrange(len(codes))] for _ in range(length)]
        if style == "instruction":
            prompts.append(INSTRUCTION_TEMPLATE.format(instruction=INSTRUCTIONS[i], history=", ".join(history)))
        else:
            prompts.append(build_prompt(history, style, rng, eos))
    return prompts


def catalogue_token_ids(tokenizer, index, style: str, seed: int) -> list[list[int]]:
    """Every catalogue item's completion tokens (EOS included) in index order, as the model
    writes them after a prompt of this style: `item_token_ids` over `probe_prompts`."""
    return item_token_ids(tokenizer, index.codes, probe_prompts(index.codes, style, seed, eos_text(tokenizer, style)))


def _tokenizer_name(tokenizer) -> str:
    return f"{type(tokenizer).__name__}({getattr(tokenizer, 'name_or_path', '') or 'unnamed'})"


def item_token_ids(tokenizer, codes: Sequence[str], probe_prompt: str | Sequence[str]) -> list[list[int]]:
    """Each item's completion tokens as produced after a prompt, then the EOS id; index order.

    For every probe prompt P and item code C, `tokenize(P + C + "\\n")` must start with
    `tokenize(P)` (the boundary is stable), and the remaining tokens must be the same after
    every probe. Raises RereError naming the tokenizer and the first offending item
    otherwise, and when two items would be written with the same tokens.

    Tokenization uses add_special_tokens=False: a BOS token in front of the prompt does not
    change how the text after it is split, and an appended EOS (add_eos_token) would.
    """
    probes = [probe_prompt] if isinstance(probe_prompt, str) else list(probe_prompt)
    if not probes:
        raise ValueError("item_token_ids needs at least one probe prompt")
    name = _tokenizer_name(tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise RereError(f"tokenizer {name} has no EOS token; completions must end with one.")
    completions = [completion_text(c) for c in codes]
    result: list[list[int]] | None = None
    for probe in probes:
        prompt_ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
        joint = tokenizer([probe + c for c in completions], add_special_tokens=False)["input_ids"]
        tails = []
        for code, ids in zip(codes, joint, strict=True):
            if ids[: len(prompt_ids)] != prompt_ids or len(ids) == len(prompt_ids):
                raise RereError(
                    f"tokenizer {name}: the prompt/completion boundary is unstable: the prompt's last tokens "
                    f"{tokenizer.convert_ids_to_tokens(prompt_ids[-3:])} change when item {code!r} follows them "
                    f"(prompt ending {probe[-40:]!r}). Use a prompt style that ends with a newline the tokenizer "
                    "keeps as its own token, or another tokenizer."
                )
            tails.append(ids[len(prompt_ids) :] + [eos])
        if result is None:
            result = tails
            continue
        for code, a, b in zip(codes, result, tails, strict=True):
            if a != b:
                raise RereError(
                    f"tokenizer {name}: item {code!r} is tokenized as {tokenizer.convert_ids_to_tokens(a)} after one "
                    f"prompt and {tokenizer.convert_ids_to_tokens(b)} after another (prompt ending {probe[-40:]!r}); "
                    "the completion's tokens must not depend on the history."
                )
    assert result is not None
    seen: dict[tuple[int, ...], int] = {}
    for pos, ids in enumerate(result):
        first = seen.setdefault(tuple(ids), pos)
        if first != pos:
            raise RereError(
                f"tokenizer {name}: items {codes[first]!r} and {codes[pos]!r} tokenize identically "
                f"({tokenizer.convert_ids_to_tokens(ids)}); the model could not tell them apart. "
                "Make the titles differ in text the tokenizer keeps (not only in unknown characters)."
            )
    return result
