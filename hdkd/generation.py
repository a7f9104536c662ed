"""Batched generation with the KV cache, and decoder hidden states for given labels.

A generation batch is encoded in smaller groups of similar length, so the encoder does little work on padding,
and then decoded as one batch, so each decoding step runs large matrix products. For T5-style decoders the
cross-attention keys and values are computed once per example from the encoder states and shared by every beam
and by the teacher-forced pass for the labels' hidden states.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

PAD_MULTIPLE = 8
# An encoder group grows while its padding stays within this share of its tokens.
ENCODER_PADDING = 0.1


@dataclass
class Generated:
    """Generated answers in input order."""

    token_ids: list[list[int]]  # without the decoder start token, cut after the first EOS
    hidden: list[torch.Tensor] | None  # (len(token_ids[i]), d_model) last decoder hidden state per answer


def pad_batch(sequences: list[list[int]], pad_id: int, multiple: int = PAD_MULTIPLE) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence rounded up to ``multiple``; return ids and attention mask."""
    longest = max(len(s) for s in sequences)
    width = -(-longest // multiple) * multiple
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids, mask


def autocast(device: torch.device, bf16: bool):
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def round_up(length: int, multiple: int = PAD_MULTIPLE) -> int:
    return -(-length // multiple) * multiple


def encoder_groups(lengths: list[int], max_padding: float = ENCODER_PADDING) -> list[slice]:
    """Split lengths sorted longest first into runs that each pad to their first length (rounded up to
    PAD_MULTIPLE) with at most ``max_padding`` * real tokens of padding."""
    groups, start, tokens = [], 0, 0
    for end, length in enumerate(lengths):
        width = round_up(lengths[start])
        if end > start and width * (end - start + 1) > (1 + max_padding) * (tokens + length):
            groups.append(slice(start, end))
            start, tokens = end, 0
        tokens += length
    groups.append(slice(start, len(lengths)))
    return groups


def cross_attention_layers(model) -> list | None:
    """Return the decoder's cross-attention modules when they have T5's layout (``k``, ``v`` projections), else None."""
    blocks = getattr(model.get_decoder(), "block", None)
    if blocks is None:
        return None
    try:
        layers = [block.layer[1].EncDecAttention for block in blocks]
    except (AttributeError, IndexError, TypeError):
        return None
    if all(hasattr(layer, "k") and hasattr(layer, "v") and hasattr(layer, "key_value_proj_dim") for layer in layers):
        return layers
    return None


@dataclass
class EncodedBatch:
    """Encoder outputs of one batch, padded to the width of its longest prompt, in the batch's order."""

    hidden: torch.Tensor  # (batch, width, d_model)
    attention_mask: torch.Tensor  # (batch, width)
    cross_keys: list[torch.Tensor] | None  # per decoder layer: (batch, heads, width, head_dim)
    cross_values: list[torch.Tensor] | None

    def cache(self, model, repeat: int = 1):
        """Return a KV cache whose cross-attention part holds this batch's keys and values, each row repeated
        ``repeat`` times (once per beam); None when the model's layout is not known (transformers builds one).

        Beam search reorders the cache after every step, but only among the beams of one example, and those
        beams share the example's cross-attention keys and values. The returned cache therefore reorders only
        the self-attention part, which skips a copy of (batch * beams, heads, width, head_dim) per layer and step.
        """
        if self.cross_keys is None:
            return None
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        class SelfAttentionReorderCache(EncoderDecoderCache):
            def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
                self.self_attention_cache.reorder_cache(beam_idx)

        def expand(states: torch.Tensor) -> torch.Tensor:
            return states.repeat_interleave(repeat, dim=0) if repeat > 1 else states

        cross = DynamicCache([(expand(k), expand(v)) for k, v in zip(self.cross_keys, self.cross_values)])
        return SelfAttentionReorderCache(DynamicCache(), cross)


def encode_batch(model, sequences: list[list[int]], pad_id: int, device: torch.device) -> EncodedBatch:
    """Run the encoder on ``sequences`` (sorted longest first) in groups of similar length.

    Each group is padded only to its own longest prompt; the outputs are then padded with zeros (masked out)
    to the batch's width. For T5-style decoders the cross-attention keys and values are computed here, once per
    example, so neither beam search nor the hidden-state pass recomputes them.
    """
    width = round_up(len(sequences[0]))
    layers = cross_attention_layers(model)
    hidden_parts, mask_parts = [], []
    key_parts: list[list[torch.Tensor]] = [[] for _ in layers or []]
    value_parts: list[list[torch.Tensor]] = [[] for _ in layers or []]
    for group in encoder_groups([len(s) for s in sequences]):
        ids, mask = pad_batch(sequences[group], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        hidden = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # (group, len, d_model)
        extra = width - ids.size(1)
        hidden_parts.append(F.pad(hidden, (0, 0, 0, extra)))
        mask_parts.append(F.pad(mask, (0, extra)))
        for index, layer in enumerate(layers or []):
            # (group, len, heads * head_dim) -> (group, heads, width, head_dim), as T5Attention lays them out.
            shape = (hidden.size(0), hidden.size(1), -1, layer.key_value_proj_dim)
            key_parts[index].append(F.pad(layer.k(hidden).view(shape).transpose(1, 2), (0, 0, 0, extra)))
            value_parts[index].append(F.pad(layer.v(hidden).view(shape).transpose(1, 2), (0, 0, 0, extra)))
    keys = [torch.cat(parts) for parts in key_parts] if layers else None
    values = [torch.cat(parts) for parts in value_parts] if layers else None
    return EncodedBatch(torch.cat(hidden_parts), torch.cat(mask_parts), keys, values)


def answer_hidden_states(out, answers: list[list[int]]) -> list[torch.Tensor] | None:
    """Gather each answer's last decoder hidden states from the decoding steps that produced its tokens.

    Step t ran the decoder on the answer's first t tokens, which is what teacher forcing computes at position t.
    ``out`` is generate()'s output with ``decoder_hidden_states``; under beam search ``out.beam_indices[i, t]`` is
    the beam row that produced token t of answer i. Returns None when a position has no step (the caller then runs
    the decoder on the answers instead).
    """
    steps = torch.stack([step[-1][:, -1] for step in out.decoder_hidden_states], dim=1)  # (rows, steps, d_model)
    beam_indices = getattr(out, "beam_indices", None)
    states = []
    for row, answer in enumerate(answers):
        if len(answer) > steps.size(1):
            return None
        positions = torch.arange(len(answer), device=steps.device)
        rows = beam_indices[row, : len(answer)] if beam_indices is not None else torch.full_like(positions, row)
        if bool((rows < 0).any()):
            return None
        states.append(steps[rows, positions].float().cpu())
    return states


def cut_at_eos(sequence: list[int], eos_id: int) -> list[int]:
    """Keep tokens up to and including the first EOS; a sequence without EOS is kept whole."""
    if eos_id in sequence:
        return sequence[: sequence.index(eos_id) + 1]
    return sequence


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar length (longest first), so padding and the slowest batch come early."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def cache_keyword(module: torch.nn.Module) -> str:
    """Return the name under which ``module.forward`` and ``generate`` take a KV cache.

    Between transformers 5.23 and 5.25 ``past_key_values`` became ``cache``. The old name raises a FutureWarning
    there, which names 5.40 as the release that removes it.
    """
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


@torch.inference_mode()
def decoder_hidden_for_labels(model, encoder_hidden: torch.Tensor, attention_mask: torch.Tensor,
                              labels: list[list[int]], pad_id: int, cache=None) -> list[torch.Tensor]:
    """Run the decoder on right-shifted ``labels`` and return the last hidden state per label position.

    encoder_hidden: (batch, src_len, d_model). ``cache`` may carry precomputed cross-attention keys and values
    (``EncodedBatch.cache``). Returns one (len(labels[i]), d_model) tensor per row.
    """
    label_ids, _ = pad_batch(labels, pad_id, multiple=1)
    label_ids = label_ids.to(encoder_hidden.device)
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=label_ids)
    decoder = model.get_decoder()
    out = decoder(input_ids=decoder_input_ids, encoder_hidden_states=encoder_hidden,
                  encoder_attention_mask=attention_mask, use_cache=cache is not None,
                  **{cache_keyword(decoder): cache})
    hidden = out.last_hidden_state  # (batch, tgt_len, d_model)
    return [hidden[row, : len(labels[row])].float().cpu() for row in range(len(labels))]


@torch.inference_mode()
def generate(model, input_ids: list[list[int]], *, pad_id: int, eos_id: int, max_new_tokens: int, num_beams: int,
             batch_size: int, device: torch.device, bf16: bool, max_label_length: int | None = None,
             with_hidden: bool = False, description: str = "generating", progress: bool = True) -> Generated:
    """Generate answers in length-sorted batches.

    With ``with_hidden`` it also returns the last decoder hidden state at each answer position, which is what
    training compares, taken from the decoding steps themselves. ``progress`` False hides the progress bar.
    """
    from transformers.modeling_outputs import BaseModelOutput

    model.eval()
    token_ids: list[list[int] | None] = [None] * len(input_ids)
    hidden: list[torch.Tensor | None] = [None] * len(input_ids)
    batches = length_sorted_batches([len(ids) for ids in input_ids], batch_size)
    with tqdm(total=len(input_ids), desc=description, unit="ex", leave=False, disable=not progress) as bar:
        for batch in batches:
            with autocast(device, bf16):
                encoded = encode_batch(model, [input_ids[i] for i in batch], pad_id, device)
                cache = encoded.cache(model, repeat=num_beams)
                out = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=encoded.hidden),
                                     attention_mask=encoded.attention_mask, do_sample=False,
                                     max_new_tokens=max_new_tokens, num_beams=num_beams,
                                     pad_token_id=pad_id, eos_token_id=eos_id, return_dict_in_generate=True,
                                     output_hidden_states=with_hidden,
                                     **({cache_keyword(model): cache} if cache is not None else {}))
                answers = [cut_at_eos(row[1:].tolist(), eos_id) for row in out.sequences]
                if max_label_length:
                    answers = [a[:max_label_length] for a in answers]
                # A row whose first token is pad is an empty answer; keep EOS so labels are never empty.
                answers = [a if a else [eos_id] for a in answers]
                if with_hidden:
                    # The search already ran the decoder on every answer prefix; a teacher-forced pass is the fallback.
                    states = answer_hidden_states(out, answers) or decoder_hidden_for_labels(
                        model, encoded.hidden, encoded.attention_mask, answers, pad_id, cache=encoded.cache(model))
            for position, index in enumerate(batch):
                token_ids[index] = answers[position]
                if with_hidden:
                    hidden[index] = states[position]
            bar.update(len(batch))
    return Generated(token_ids, hidden if with_hidden else None)


@torch.inference_mode()
def hidden_for_labels(model, input_ids: list[list[int]], labels: list[list[int]], *, pad_id: int, batch_size: int,
                      device: torch.device, bf16: bool, description: str = "teacher hidden states") -> list[torch.Tensor]:
    """Teacher-forced last decoder hidden states for fixed labels (gold answers), in input order."""
    model.eval()
    result: list[torch.Tensor | None] = [None] * len(input_ids)
    with tqdm(total=len(input_ids), desc=description, unit="ex", leave=False) as bar:
        for batch in length_sorted_batches([len(ids) for ids in input_ids], batch_size):
            with autocast(device, bf16):
                encoded = encode_batch(model, [input_ids[i] for i in batch], pad_id, device)
                states = decoder_hidden_for_labels(model, encoded.hidden, encoded.attention_mask,
                                                   [labels[i] for i in batch], pad_id, cache=encoded.cache(model))
            for position, index in enumerate(batch):
                result[index] = states[position]
            bar.update(len(batch))
    return result
