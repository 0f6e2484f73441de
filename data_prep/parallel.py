"""Tokenize batches of documents in worker processes, returning results in input order.

The output must not depend on the number of workers, so results are consumed strictly in
the order the batches were submitted. At most `max_pending` batches are in flight, which
bounds memory however far the reader could run ahead.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from mars_m_exp.data.shards import TOKEN_DTYPE
from mars_m_exp.data.tokenizer import encode_document, gpt2_encoding

Item = TypeVar("Item")
Result = TypeVar("Result")


def encode_batch(batch: tuple[list[int], list[str]]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Tokenize numbered documents as [EOT] + BPE(text) each.

    Returns the document numbers, all their tokens concatenated as uint16, and the
    number of tokens of each document.
    """
    numbers, texts = batch
    arrays = [np.array(encode_document(text), dtype=TOKEN_DTYPE) for text in texts]
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    tokens = np.concatenate(arrays) if arrays else np.empty(0, dtype=TOKEN_DTYPE)
    return numbers, tokens, lengths


def _pool_context() -> multiprocessing.context.BaseContext:
    # Fork is unsafe here: the parent runs pyarrow and tqdm threads. A forkserver imports
    # this module once and forks the workers from that single-threaded server, which
    # starts them faster than spawn (each spawned worker would import torch again).
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def ordered_map(
    function: Callable[[Item], Result], items: Iterable[Item], num_proc: int, max_pending: int | None = None
) -> Iterator[Result]:
    """Yield function(item) for each item, in order, computed by `num_proc` worker processes.

    With num_proc <= 1 everything runs in this process.
    """
    if num_proc <= 1:
        for item in items:
            yield function(item)
        return

    max_pending = max_pending or 2 * num_proc
    with _pool_context().Pool(num_proc, initializer=gpt2_encoding) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(function, (item,)))
            if len(pending) >= max_pending:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
