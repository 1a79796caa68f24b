"""Synthetic sequence tasks on which attention matters, generated on the fly.

Every task produces token sequences of length ``seq_len + 1`` starting with the
beginning-of-sequence token 0; the model reads the first ``seq_len`` tokens and predicts
the last ``seq_len`` (``targets[t] = tokens[t + 1]``). Only the positions a task marks as
``scored`` count towards the loss, so the loss measures the part that needs attention.

- ``copy``: ``BOS a_1 .. a_n a_1 .. a_n`` with ``n = seq_len / 2`` tokens drawn uniformly
  from ``1 .. V-1``; the repeated half is scored. Chance loss ``log(V - 1)``.
- ``recall`` (multi-query associative recall): ``BOS k_1 v_1 .. k_m v_m q_1 a_1 q_2 a_2 ..``
  with distinct keys from ``1 .. K``, values from ``K+1 .. V-1`` (``K = (V-1) // 2``),
  ``m = min(K, seq_len // 4)`` pairs, queries drawn from the context's keys and ``a_j`` the
  value bound to ``q_j``; the answers are scored. A lookup by content, harder than copy,
  which position alone solves. Chance loss ``log(V - 1 - K)``.
- ``manykeys``: recall with ``8`` values (``V-8 .. V-1``) and ``K = V - 9`` keys, so that
  with a large vocabulary the values in the context are learned long before the keys'
  lookup (``m = min(K, seq_len // 4)`` pairs). Chance loss ``log 8``.
- ``absentkeys``: ``manykeys`` where each query asks, with probability 1/8, for a key
  that is not in the context, and its answer is a value of the context drawn at random:
  the best prediction there attends evenly to the context's values, so the attention of
  those rows stays spread and their loss (about the entropy of the context's values)
  cannot go to zero, while the other queries are exact lookups. Chance loss ``log 8``.
- ``pairs`` (recall with one token per key-value pair): ``BOS c_1 .. c_m q_1 a_1 q_2 a_2 ..``
  where each context token ``c_i`` stands for a pair (key, value) of ``n`` keys and ``n``
  values (``n = isqrt(V) - 1``: tokens ``1 .. n`` are the keys as queries, ``n+1 .. 2n`` the
  values as answers, ``2n+1 .. 2n+n^2`` the pairs), ``m = min(n, seq_len // 4)`` distinct
  keys, queries drawn from them; the answers are scored. One attention step by content
  solves it (no previous-token head needed, unlike ``recall``). Chance loss ``log(n)``.

Data comes from a NumPy generator seeded independently of the model, so every variant
sees the same stream whatever its device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

BOS = 0


@dataclass(frozen=True)
class TokenBatch:
    """A batch as NumPy arrays: ``inputs``/``targets`` int64 (B, L), ``scored`` bool (B, L)."""

    inputs: np.ndarray
    targets: np.ndarray
    scored: np.ndarray


def _split(tokens: np.ndarray, scored_tokens: np.ndarray) -> TokenBatch:
    return TokenBatch(
        inputs=np.ascontiguousarray(tokens[:, :-1]),
        targets=np.ascontiguousarray(tokens[:, 1:]),
        scored=np.ascontiguousarray(scored_tokens[:, 1:]),
    )


def generate_copy(rng: np.random.Generator, batch_size: int, seq_len: int,
                  vocab_size: int) -> TokenBatch:
    if seq_len < 4 or seq_len % 2:
        raise ValueError(f"the copy task needs an even seq_len >= 4, got {seq_len}")
    if vocab_size < 3:
        raise ValueError(f"the copy task needs vocab_size >= 3, got {vocab_size}")
    half = seq_len // 2
    content = rng.integers(1, vocab_size, size=(batch_size, half), dtype=np.int64)
    bos = np.full((batch_size, 1), BOS, dtype=np.int64)
    tokens = np.concatenate([bos, content, content], axis=1)
    scored = np.zeros(tokens.shape, dtype=bool)
    scored[:, 1 + half:] = True
    return _split(tokens, scored)


def recall_layout(seq_len: int, vocab_size: int, num_values: int | None = None
                  ) -> tuple[int, int, int]:
    """(number of keys K, context pairs m, queries) of the recall task; ``num_values``
    None: half the vocabulary each (``K = (V-1) // 2``), else ``K = V - 1 - num_values``
    (the ``manykeys`` task)."""
    num_keys = (vocab_size - 1) // 2 if num_values is None else vocab_size - 1 - num_values
    if num_keys < 1 or vocab_size - 1 - num_keys < 2:
        raise ValueError(f"the recall task needs vocab_size >= 5, got {vocab_size}")
    pairs = min(num_keys, seq_len // 4)
    queries = (seq_len - 2 * pairs) // 2
    if pairs < 1 or queries < 1:
        raise ValueError(f"the recall task needs seq_len >= 4, got {seq_len}")
    return num_keys, pairs, queries


def generate_recall(rng: np.random.Generator, batch_size: int, seq_len: int,
                    vocab_size: int, num_values: int | None = None,
                    absent_share: float = 0.0) -> TokenBatch:
    num_keys, pairs, queries = recall_layout(seq_len, vocab_size, num_values)
    order = np.argsort(rng.random((batch_size, num_keys)), axis=1) + 1
    keys = order[:, :pairs]
    values = rng.integers(num_keys + 1, vocab_size, size=(batch_size, pairs), dtype=np.int64)
    which = rng.integers(0, pairs, size=(batch_size, queries))
    query_keys = np.take_along_axis(keys, which, axis=1)
    answers = np.take_along_axis(values, which, axis=1)
    if absent_share > 0:
        if num_keys <= pairs:
            raise ValueError(f"absent keys need more keys ({num_keys}) than pairs ({pairs})")
        # a query for a key not in the context; its answer, a value of the context drawn
        # at random, is best predicted by attending evenly to the context's values
        absent = rng.random((batch_size, queries)) < absent_share
        pick = rng.integers(pairs, num_keys, size=(batch_size, queries))
        drawn = np.take_along_axis(values, rng.integers(0, pairs, size=(batch_size, queries)),
                                   axis=1)
        query_keys = np.where(absent, np.take_along_axis(order, pick, axis=1), query_keys)
        answers = np.where(absent, drawn, answers)

    tokens = np.full((batch_size, seq_len + 1), BOS, dtype=np.int64)
    scored = np.zeros(tokens.shape, dtype=bool)
    tokens[:, 1:1 + 2 * pairs:2] = keys
    tokens[:, 2:2 + 2 * pairs:2] = values
    start = 1 + 2 * pairs
    tokens[:, start:start + 2 * queries:2] = query_keys
    tokens[:, start + 1:start + 2 * queries:2] = answers
    scored[:, start + 1:start + 2 * queries:2] = True
    return _split(tokens, scored)


MANYKEYS_VALUES = 8  # values of the manykeys task; every other non-BOS token is a key


def generate_manykeys(rng: np.random.Generator, batch_size: int, seq_len: int,
                      vocab_size: int) -> TokenBatch:
    return generate_recall(rng, batch_size, seq_len, vocab_size, MANYKEYS_VALUES)


ABSENT_SHARE = 0.125  # share of the absentkeys task's queries whose key is not in the context


def generate_absentkeys(rng: np.random.Generator, batch_size: int, seq_len: int,
                        vocab_size: int) -> TokenBatch:
    return generate_recall(rng, batch_size, seq_len, vocab_size, MANYKEYS_VALUES, ABSENT_SHARE)


def pairs_layout(seq_len: int, vocab_size: int) -> tuple[int, int, int]:
    """(keys = values n, context pairs m, queries) of the one-token-pair recall task."""
    n = math.isqrt(vocab_size) - 1
    if n < 2:
        raise ValueError(f"the pairs task needs vocab_size >= 9, got {vocab_size}")
    pairs = min(n, seq_len // 4)
    queries = (seq_len - pairs) // 2
    if pairs < 1 or queries < 1:
        raise ValueError(f"the pairs task needs seq_len >= 4, got {seq_len}")
    return n, pairs, queries


def generate_pairs(rng: np.random.Generator, batch_size: int, seq_len: int,
                   vocab_size: int) -> TokenBatch:
    n, pairs, queries = pairs_layout(seq_len, vocab_size)
    keys = np.argsort(rng.random((batch_size, n)), axis=1)[:, :pairs]  # 0 .. n-1
    values = rng.integers(0, n, size=(batch_size, pairs), dtype=np.int64)
    which = rng.integers(0, pairs, size=(batch_size, queries))
    query_keys = np.take_along_axis(keys, which, axis=1)
    answers = np.take_along_axis(values, which, axis=1)

    tokens = np.full((batch_size, seq_len + 1), BOS, dtype=np.int64)
    scored = np.zeros(tokens.shape, dtype=bool)
    tokens[:, 1:1 + pairs] = 1 + 2 * n + keys * n + values
    start = 1 + pairs
    tokens[:, start:start + 2 * queries:2] = 1 + query_keys
    tokens[:, start + 1:start + 2 * queries:2] = 1 + n + answers
    scored[:, start + 1:start + 2 * queries:2] = True
    return _split(tokens, scored)


MAJORITY_SHARE = 0.25  # chance that a content token is the planted majority symbol


def generate_majority(rng: np.random.Generator, batch_size: int, seq_len: int,
                      vocab_size: int) -> TokenBatch:
    if seq_len < 4:
        raise ValueError(f"the majority task needs seq_len >= 4, got {seq_len}")
    if vocab_size < 3:
        raise ValueError(f"the majority task needs vocab_size >= 3, got {vocab_size}")
    planted = rng.integers(1, vocab_size, size=(batch_size, 1), dtype=np.int64)
    content = rng.integers(1, vocab_size, size=(batch_size, seq_len - 1), dtype=np.int64)
    content = np.where(rng.random(content.shape) < MAJORITY_SHARE, planted, content)
    counts = np.stack([(content == symbol).sum(axis=1) for symbol in range(vocab_size)], axis=1)
    answer = counts.argmax(axis=1)[:, None]  # the mode; the smallest symbol on a (rare) tie
    bos = np.full((batch_size, 1), BOS, dtype=np.int64)
    tokens = np.concatenate([bos, content, answer], axis=1)
    scored = np.zeros(tokens.shape, dtype=bool)
    scored[:, -1] = True
    return _split(tokens, scored)


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    generate: Callable[[np.random.Generator, int, int, int], TokenBatch]
    chance_loss: Callable[[int, int], float]  # (seq_len, vocab_size) -> nats


TASKS: dict[str, Task] = {
    "copy": Task(
        name="copy",
        description="random tokens then their repetition; the repeated half is scored",
        generate=generate_copy,
        chance_loss=lambda seq_len, vocab: math.log(vocab - 1),
    ),
    "recall": Task(
        name="recall",
        description="multi-query associative recall: key-value pairs, then queried keys "
                    "whose values are scored",
        generate=generate_recall,
        chance_loss=lambda seq_len, vocab: math.log(
            vocab - 1 - recall_layout(seq_len, vocab)[0]),
    ),
    "manykeys": Task(
        name="manykeys",
        description="associative recall with 8 values and every other token a key: "
                    "key-value pairs, then queried keys whose values are scored",
        generate=generate_manykeys,
        chance_loss=lambda seq_len, vocab: math.log(MANYKEYS_VALUES),
    ),
    "absentkeys": Task(
        name="absentkeys",
        description="manykeys where an eighth of the queries ask for a key absent from "
                    "the context, answered by a random value of the context",
        generate=generate_absentkeys,
        chance_loss=lambda seq_len, vocab: math.log(MANYKEYS_VALUES),
    ),
    "pairs": Task(
        name="pairs",
        description="associative recall with one token per key-value pair, then queried "
                    "keys whose values are scored",
        generate=generate_pairs,
        chance_loss=lambda seq_len, vocab: math.log(pairs_layout(seq_len, vocab)[0]),
    ),
    "majority": Task(
        name="majority",
        description="random tokens with one symbol planted in a quarter of them; the "
                    "last position predicts the most frequent symbol",
        generate=generate_majority,
        chance_loss=lambda seq_len, vocab: math.log(vocab - 1),
    ),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None


def batch_stream(task: Task, seed: int, batch_size: int, seq_len: int,
                 vocab_size: int) -> Iterator[TokenBatch]:
    """An endless, reproducible stream of batches drawn from ``seed`` alone."""
    rng = np.random.default_rng(seed)
    while True:
        yield task.generate(rng, batch_size, seq_len, vocab_size)


def fixed_batches(task: Task, seed: int, count: int, batch_size: int, seq_len: int,
                  vocab_size: int) -> list[TokenBatch]:
    stream = batch_stream(task, seed, batch_size, seq_len, vocab_size)
    return [next(stream) for _ in range(count)]
