"""BM25 retrieval: the best document first, and no library debug log on the user's terminal."""
import logging

from pdistill_jax.retrieval import BM25Index


def test_bm25_finds_the_document_that_shares_the_query_words_and_logs_nothing(caplog):
    docs = ["The lighthouse of Velloria was built in 1873.", "Pipwhistle birds nest in reeds.",
            "The river Tarsk floods every spring."]
    with caplog.at_level(logging.DEBUG):  # a root handler that takes everything, as absl's does
        index = BM25Index(docs)
        hits = index.search(["When was the lighthouse built?", "Where do pipwhistle birds nest?"], 2)
    assert [row[0] for row in hits] == [0, 1] and all(len(row) == 2 for row in hits)
    assert not [r for r in caplog.records if r.name.startswith("bm25s")]
    assert BM25Index(docs[:1]).search(["river"], 5) == [[0]]  # k is capped at the documents
