"""Batched generation with the KV cache, and decoder hidden states for given labels."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

PAD_MULTIPLE = 8


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


def cut_at_eos(sequence: list[int], eos_id: int) -> list[int]:
    """Keep tokens up to and including the first EOS; a sequence without EOS is kept whole."""
    if eos_id in sequence:
        return sequence[: sequence.index(eos_id) + 1]
    return sequence


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar length (longest first), so padding and the slowest batch come early."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def decoder_hidden_for_labels(model, encoder_hidden: torch.Tensor, attention_mask: torch.Tensor,
                              labels: list[list[int]], pad_id: int) -> list[torch.Tensor]:
    """Run the decoder on right-shifted ``labels`` and return the last hidden state per label position.

    encoder_hidden: (batch, src_len, d_model). Returns one (len(labels[i]), d_model) tensor per row.
    """
    label_ids, _ = pad_batch(labels, pad_id, multiple=1)
    label_ids = label_ids.to(encoder_hidden.device)
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=label_ids)
    out = model.get_decoder()(input_ids=decoder_input_ids, encoder_hidden_states=encoder_hidden,
                              encoder_attention_mask=attention_mask)
    hidden = out.last_hidden_state  # (batch, tgt_len, d_model)
    return [hidden[row, : len(labels[row])].float().cpu() for row in range(len(labels))]


@torch.inference_mode()
def generate(model, input_ids: list[list[int]], *, pad_id: int, eos_id: int, max_new_tokens: int, num_beams: int,
             batch_size: int, device: torch.device, bf16: bool, max_label_length: int | None = None,
             with_hidden: bool = False, description: str = "generating") -> Generated:
    """Generate answers in length-sorted batches, reusing each batch's encoder pass for the hidden states.

    With ``with_hidden`` the decoder is run once more on the generated answer (teacher forcing, KV cache not
    needed) to return the last decoder hidden state at each answer position, which is what training compares.
    """
    model.eval()
    token_ids: list[list[int] | None] = [None] * len(input_ids)
    hidden: list[torch.Tensor | None] = [None] * len(input_ids)
    batches = length_sorted_batches([len(ids) for ids in input_ids], batch_size)
    with tqdm(total=len(input_ids), desc=description, unit="ex", leave=False) as bar:
        for batch in batches:
            ids, mask = pad_batch([input_ids[i] for i in batch], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            with autocast(device, bf16):
                encoder_outputs = model.get_encoder()(input_ids=ids, attention_mask=mask)
                out = model.generate(encoder_outputs=encoder_outputs, attention_mask=mask, do_sample=False,
                                     max_new_tokens=max_new_tokens, num_beams=num_beams,
                                     pad_token_id=pad_id, eos_token_id=eos_id)
                answers = [cut_at_eos(row[1:].tolist(), eos_id) for row in out]
                if max_label_length:
                    answers = [a[:max_label_length] for a in answers]
                # A row whose first token is pad is an empty answer; keep EOS so labels are never empty.
                answers = [a if a else [eos_id] for a in answers]
                if with_hidden:
                    states = decoder_hidden_for_labels(model, encoder_outputs.last_hidden_state, mask, answers,
                                                       pad_id)
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
            ids, mask = pad_batch([input_ids[i] for i in batch], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            with autocast(device, bf16):
                encoder_hidden = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
                states = decoder_hidden_for_labels(model, encoder_hidden, mask, [labels[i] for i in batch], pad_id)
            for position, index in enumerate(batch):
                result[index] = states[position]
            bar.update(len(batch))
    return result
