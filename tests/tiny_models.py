"""Tiny randomly-initialised causal LMs with their own small tokenizers, built in a second."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from gkt.jobs import Task
from gkt.prompts import exemplar_block

_SPECIALS = ["<pad>", "<s>", "</s>"]


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the few-shot exemplars; its alphabet is what they use (ASCII), so any
    token sequence decodes to valid text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIALS)
    corpus = [exemplar_block(task=task) for task in Task] + [
        "Q: A: The answer is 0123456789 (A) (B) (C) (D) (E)"
    ]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


def build_teacher(directory: Path, *, seed: int = 0) -> Path:
    """A 2-layer Gemma 3 (sliding-window attention, like the bundled teacher), vocab ≈ 400."""
    tokenizer = build_tokenizer(400)
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=32,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save(Gemma3ForCausalLM(config), tokenizer, directory)


def build_student(directory: Path, *, seed: int = 1) -> Path:
    """A 2-layer Llama with a different vocabulary (≈ 300) from the teacher's."""
    tokenizer = build_tokenizer(300)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save(LlamaForCausalLM(config), tokenizer, directory)


def _save(model: Any, tokenizer: PreTrainedTokenizerFast, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
