"""Teacher work done once and cached: generated labels, validation answers and last decoder hidden states.

An entry is keyed by the teacher's weights, the tokenized rows, the label source, the generation settings and
the dtypes, so later epochs, trials, studies and processes reuse it instead of running the teacher again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hdkd import caching, generation
from hdkd.data import PROMPT_VERSION

logger = logging.getLogger(__name__)

CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class _Counter:
    """Examples the teacher generated answers for in this process (cache hits do not count)."""

    generations = 0


counter = _Counter()


@dataclass
class TeacherOutputs:
    """Teacher results for one split, in the split's order."""

    answers: list[list[int]] | None  # generated token ids; None when nothing was generated
    labels: list[list[int]]  # student labels: the answers, or the gold letters
    hidden: list[torch.Tensor] | None  # (len(labels[i]), d_teacher) per example, or None for the online teacher
    from_cache: bool


def _flatten(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    flat = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
    return flat, torch.tensor([len(s) for s in sequences], dtype=torch.long)


def _unflatten(flat: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    return [chunk.tolist() for chunk in torch.split(flat, lengths.tolist())]


def _save(folder_tmp: Path, outputs: TeacherOutputs, dtype: torch.dtype) -> None:
    tensors = {}
    if outputs.answers is not None:
        tensors["answer_ids"], tensors["answer_lengths"] = _flatten(outputs.answers)
    tensors["label_ids"], tensors["label_lengths"] = _flatten(outputs.labels)
    if outputs.hidden is not None:
        tensors["hidden"] = torch.cat(outputs.hidden).to(dtype).contiguous()
    save_file(tensors, str(folder_tmp / "teacher.safetensors"), metadata={"format": "pt"})


def _load(folder: Path) -> TeacherOutputs:
    tensors = load_file(str(folder / "teacher.safetensors"))
    answers = _unflatten(tensors["answer_ids"], tensors["answer_lengths"]) if "answer_ids" in tensors else None
    labels = _unflatten(tensors["label_ids"], tensors["label_lengths"])
    hidden = None
    if "hidden" in tensors:
        hidden = list(torch.split(tensors["hidden"].float(), tensors["label_lengths"].tolist()))
    return TeacherOutputs(answers, labels, hidden, from_cache=True)


def teacher_outputs(teacher, dataset, *, split: str, label_source: str, with_hidden: bool, generation_cfg,
                    max_label_length: int, weights_digest: str, cache_dir: str | Path, cache_dtype: str,
                    pad_id: int, eos_id: int, device: torch.device, bf16: bool) -> TeacherOutputs:
    """Return (from cache, or by running the teacher once) the teacher's answers, labels and hidden states.

    The validation split always generates answers (they give the teacher's accuracy); the training split does
    so only with ``label_source == "teacher"``.
    """
    input_ids = [list(ids) for ids in dataset["input_ids"]]
    generate_answers = split == "validation" or label_source == "teacher"
    key = caching.fingerprint({
        "kind": "teacher", "split": split, "ids": dataset["id"], "input_ids": input_ids,
        "gold": dataset["gold_labels"] if label_source == "gold" else None, "teacher": weights_digest,
        "label_source": label_source, "prompt": PROMPT_VERSION, "with_hidden": with_hidden,
        "generation": {"max_new_tokens": generation_cfg.max_new_tokens, "num_beams": generation_cfg.num_beams}
        if generate_answers else None,
        "max_label_length": max_label_length, "bf16": bf16, "cache_dtype": cache_dtype,
        "teacher_dtype": str(next(teacher.parameters()).dtype),
        "attention": getattr(teacher.config, "_attn_implementation", None),
    })
    folder = Path(cache_dir) / "teacher" / key
    with caching.locked(folder):
        if caching.verify(folder, key):
            logger.info("teacher outputs for %d %s examples loaded from cache %s", len(input_ids), split, folder)
            return _load(folder)
        outputs = _run_teacher(teacher, dataset, input_ids, split=split, label_source=label_source,
                               generate_answers=generate_answers, with_hidden=with_hidden,
                               generation_cfg=generation_cfg, max_label_length=max_label_length, pad_id=pad_id,
                               eos_id=eos_id, device=device, bf16=bf16)
        caching.write_entry(folder, key, lambda tmp: _save(tmp, outputs, CACHE_DTYPES[cache_dtype]),
                            meta={"split": split, "examples": len(input_ids), "label_source": label_source})
    if outputs.hidden is not None and cache_dtype != "float32":
        outputs.hidden = [h.to(CACHE_DTYPES[cache_dtype]).float() for h in outputs.hidden]
    return outputs


def _run_teacher(teacher, dataset, input_ids, *, split, label_source, generate_answers, with_hidden, generation_cfg,
                 max_label_length, pad_id, eos_id, device, bf16) -> TeacherOutputs:
    answers, hidden = None, None
    gold = [list(ids)[:max_label_length] for ids in dataset["gold_labels"]]
    if generate_answers:
        hidden_from_answers = with_hidden and label_source == "teacher"
        result = generation.generate(
            teacher, input_ids, pad_id=pad_id, eos_id=eos_id, max_new_tokens=generation_cfg.max_new_tokens,
            num_beams=generation_cfg.num_beams, batch_size=generation_cfg.batch_size, device=device, bf16=bf16,
            max_label_length=max_label_length, with_hidden=hidden_from_answers,
            description=f"teacher answers ({split})")
        counter.generations += len(input_ids)
        answers, hidden = result.token_ids, result.hidden
    labels = answers if label_source == "teacher" else gold
    if with_hidden and hidden is None:
        hidden = generation.hidden_for_labels(teacher, input_ids, labels, pad_id=pad_id,
                                              batch_size=generation_cfg.batch_size, device=device, bf16=bf16,
                                              description=f"teacher hidden states ({split})")
    return TeacherOutputs(answers, labels, hidden, from_cache=False)
