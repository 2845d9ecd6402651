"""Datasets for training: built-in synthetic VQA and text, LLaVA conversations, text corpora, and the batch iterator.

Every dataset is a sequence of :class:`Sample` (token ids, loss mask, images);
:class:`BatchIterator` turns one into fixed-shape packed batches, deterministic
per seed, resumable from two ints and sharded across data-parallel ranks.
"""

from ..packing import Sample
from .images import load_image, preprocess_image, to_pil
from .llava import load_llava
from .loader import BatchIterator
from .records import BadRecords, DataError, DataWarning, SampleSet
from .synthetic import EvalExample, SyntheticVQA, default_tokenizer, exact_match, synthetic_corpus
from .text import load_text, read_texts, text_samples

__all__ = ["Sample", "SampleSet", "BadRecords", "DataError", "DataWarning", "BatchIterator", "SyntheticVQA",
           "EvalExample", "default_tokenizer", "exact_match", "synthetic_corpus", "load_llava", "load_text",
           "read_texts", "text_samples", "load_image", "preprocess_image", "to_pil"]
