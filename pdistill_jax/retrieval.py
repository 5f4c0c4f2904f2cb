"""BM25 retrieval over a list of texts: the documents RAG reads (infer/answer.py), the sentences
of one document the teacher reads again (datagen/answers.py). bm25s: a small, well-kept,
pure-Python library."""
from __future__ import annotations

import logging
from typing import Sequence


class BM25Index:
    def __init__(self, texts: Sequence[str]):
        import bm25s

        # bm25s sets its own logger to DEBUG, which prints mid-progress-bar once anything (absl,
        # orbax) has given the root logger a handler.
        logging.getLogger("bm25s").setLevel(logging.WARNING)
        if not texts:
            raise ValueError("cannot build a BM25 index over zero documents")
        self._n = len(texts)
        self._retriever = bm25s.BM25()
        self._retriever.index(bm25s.tokenize(list(texts), stopwords="en", show_progress=False),
                              show_progress=False)

    def search(self, queries: Sequence[str], k: int) -> list[list[int]]:
        """Indices of the top-k documents for each query, best first."""
        import bm25s

        k = min(k, self._n)
        ids, _ = self._retriever.retrieve(bm25s.tokenize(list(queries), stopwords="en",
                                                         show_progress=False),
                                          k=k, show_progress=False)
        return [[int(i) for i in row] for row in ids]
