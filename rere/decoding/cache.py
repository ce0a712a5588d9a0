"""The model side of our decoding loops: left-padded prefill, one-token steps, and a KV cache
whose prompt part is written once and shared by all beams (or samples) of that prompt."""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from rere import RereError


def left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (b, T) input ids and attention mask."""
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise RereError(f"prompt {i} is empty; every prompt needs at least one token.")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Deterministic forward passes (no dropout), restoring the caller's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def prefill(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
    """One forward pass over the left-padded prompts: last-position logits (b, V), the cache,
    and each row's last position id (b, 1). Position ids follow `generate`: count of real
    tokens so far minus one, 0 on padding."""
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (b, T)
    kwargs = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # only the last position's logits: (b, 1, V), not (b, T, V)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        cache=DynamicCache(config=model.config),
        use_cache=True,
        **kwargs,
    )
    return out.logits[:, -1, :].float(), out.cache, positions[:, -1:]


class SharedPromptLayer(DynamicLayer):
    """One attention layer's cache for the beams (or samples) of prompts that share their prompt.

    `DynamicLayer` grows by concatenation (a copy of the whole cache per token) and beam
    reordering gathers the whole cache (another copy per step). Here the prompt's keys and
    values are written once, repeated to the rows of each prompt, into a buffer with room
    for `capacity` new tokens: a new token is written in place, and a reorder, which only
    ever permutes rows of the same prompt, touches only the generated slots (the prompt
    part is identical across those rows).
    """

    def __init__(self, layer: DynamicLayer, repeats: int, capacity: int):
        super().__init__()
        keys, values = layer.keys, layer.values  # (b, H, T, D)
        b, heads, prompt, dim = keys.shape
        self.key_buffer = keys.new_empty((b * repeats, heads, prompt + capacity, dim))
        self.value_buffer = values.new_empty((b * repeats, values.shape[1], prompt + capacity, values.shape[-1]))
        self.key_buffer[:, :, :prompt] = keys.repeat_interleave(repeats, dim=0)  # (b*R, H, T, D)
        self.value_buffer[:, :, :prompt] = values.repeat_interleave(repeats, dim=0)
        self.prompt_length = self.length = prompt
        self.device = keys.device
        self.is_initialized = True
        self._expose()

    def _expose(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]  # (b*R, H, T+t, D) view, no copy
        self.values = self.value_buffer[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[-2]
        if self.length + new > self.key_buffer.shape[-2]:
            raise RuntimeError("shared-prompt cache is full; this is a bug in rere.decoding.")
        self.key_buffer[:, :, self.length : self.length + new] = key_states
        self.value_buffer[:, :, self.length : self.length + new] = value_states
        self.length += new
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        start, end = self.prompt_length, self.length
        if end > start:
            self.key_buffer[:, :, start:end] = self.key_buffer[beam_idx, :, start:end]
            self.value_buffer[:, :, start:end] = self.value_buffer[beam_idx, :, start:end]

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a shared-prompt cache is already expanded")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a shared-prompt cache keeps all its rows")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a shared-prompt cache is not croppable")


def expand_cache(cache: DynamicCache, repeats: int, capacity: int) -> None:
    """Expand a prefilled cache of b prompts to b*repeats rows, in place.

    Plain attention layers become `SharedPromptLayer`s; any other layer kind (sliding
    window, linear attention...) makes the whole cache fall back to transformers' own
    `batch_repeat_interleave`, reordered by `reorder_cache` like stock beam search does.
    Rows r*repeats .. r*repeats + repeats - 1 belong to prompt r; reorders must stay within them.
    """
    if cache.layers and all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers):
        cache.layers = [SharedPromptLayer(layer, repeats, capacity) for layer in cache.layers]
    else:
        cache.batch_repeat_interleave(repeats)


def decode_step(
    model,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache,
    out: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed one token per row: tokens (N,), mask (N, T+t+1), positions (N, 1) -> logits (N, V),
    or with `rows` (R,) only those rows' logits, (R, V) (every row still updates the cache).

    With `out` (at least (N, V), float32), the logits are written into it when the model's
    logits are exactly its output layer applied to its decoder's last hidden state (checked
    once per model, `plain_head`): on CPU a fresh (N, V) tensor per step costs more in page
    faults than the matrix product that fills it, and the rows not asked for are not computed.
    Otherwise `out` is ignored.
    """
    kwargs = {"attention_mask": mask, "position_ids": positions, "cache": cache, "use_cache": True}
    head = plain_head(model) if out is not None else None
    if head is not None:
        decoder, linear = head
        hidden = decoder(input_ids=tokens[:, None], **kwargs).last_hidden_state[:, -1, :]  # (N, H)
        if rows is not None:
            hidden = hidden.index_select(0, rows)  # (R, H)
        return _project(hidden, linear, out[: len(hidden)])
    logits = model(input_ids=tokens[:, None], **kwargs).logits[:, -1, :].float()  # input_ids (N, 1) -> (N, V)
    return logits if rows is None else logits.index_select(0, rows)


def _project(hidden: torch.Tensor, linear: torch.nn.Linear, out: torch.Tensor) -> torch.Tensor:
    """linear(hidden) written into out: (N, H) -> (N, V), the same kernel as `nn.Linear` on (N, 1, H)."""
    if linear.bias is None:
        return torch.mm(hidden, linear.weight.t(), out=out)
    return torch.addmm(linear.bias, hidden, linear.weight.t(), out=out)


# model -> (decoder, output layer) or None; checked once per model object.
_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plain_head(model) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(decoder, output layer) when `model(...).logits` is exactly `output_layer(decoder(...)
    .last_hidden_state)`, on CPU in float32; else None (logit soft-capping or scaling, a bias
    the check does not reproduce, another device or dtype, wrappers: the model's own forward
    is used). The check runs both on two one-token rows (a decode step's shape) and compares bit for bit."""
    if model in _HEADS:
        return _HEADS[model]
    head = None
    try:
        linear = model.get_output_embeddings()
        decoder = model.get_decoder()
        weight = linear.weight
        if type(linear) is torch.nn.Linear and decoder is not model and weight.device.type == "cpu":
            if weight.dtype == torch.float32:
                ids = torch.tensor([[1], [2]], device=weight.device) % weight.shape[0]  # (2, 1): a decode step's shape
                with torch.inference_mode():
                    expected = model(input_ids=ids).logits[:, -1, :]  # (2, V)
                    hidden = decoder(input_ids=ids).last_hidden_state[:, -1, :]  # (2, H)
                    got = _project(hidden, linear, torch.empty_like(expected))
                if torch.equal(got, expected):
                    head = (decoder, linear)
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        head = None
    _HEADS[model] = head
    return head
