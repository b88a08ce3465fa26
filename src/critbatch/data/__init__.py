"""Token data: tokenizers, ``prepare`` (text or token files -> shards + meta.json), the memmap
reader and the fixed-order sequence stream."""

from .dataset import TokenData, SequenceStream, open_data
from .prepare import prepare, prepare_embedded, EMBEDDED_CORPORA
from .tokenizer import load_tokenizer

__all__ = ["TokenData", "SequenceStream", "open_data", "prepare", "prepare_embedded",
           "EMBEDDED_CORPORA", "load_tokenizer"]
