"""BM25 over items' caption words (cart_core/lexical.py): values, candidate scoring, leave-one-out."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cart_core.lexical import B, K1, ItemTerms, TermIndex, stem, term_hash, words

CAPTIONS = [  # (item row, caption)
    (0, "A man plays the accordion on a street"),
    (0, "a man playing an accordion"),
    (1, "A man plays the harmonica on a street"),
    (1, "a man playing a harmonica outdoors"),
    (2, "Two dogs run on the beach"),
    (2, "two dogs running through the sand"),
]


def index(n_items: int = 4) -> TermIndex:  # item 3 has no caption
    rows = np.array([r for r, _ in CAPTIONS])
    return TermIndex(ItemTerms.from_captions(rows, [t for _, t in CAPTIONS], n_items))


def bm25_by_hand(query: str, docs: list[list[str]], row: int) -> float:
    """The textbook formula over stemmed words, documents with words only."""
    n = sum(1 for d in docs if d)
    mean = sum(len(d) for d in docs if d) / n
    score = 0.0
    for w in set(words(query)):
        df = sum(1 for d in docs if w in d)
        tf = docs[row].count(w)
        if tf and df:
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            score += idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * len(docs[row]) / mean))
    return score


def test_words_are_lower_cased_split_and_stemmed():
    assert words("Two Dogs, running!") == ["two", "dog", "run"]
    assert words("Café: niños_y perros") == ["café", "niño", "y", "perro"]  # any script; _ splits
    assert stem("is") == "is" and stem("bus") == "bus" and words("") == []


@pytest.mark.parametrize("forms", [("horse", "horses"), ("run", "running"), ("smile", "smiling", "smiled"),
                                   ("glass", "glasses"), ("box", "boxes"), ("baby", "babies"),
                                   ("stop", "stopped"), ("fall", "falling"), ("play", "plays", "played")])
def test_inflections_of_a_word_meet(forms):
    assert len({stem(w) for w in forms}) == 1


def test_term_ids_are_stable_across_processes():
    assert term_hash("dog") == 5750585903842312732  # blake2b, not Python's salted hash()
    assert 0 <= term_hash("anything") < 2 ** 63


@pytest.mark.parametrize("query", ["a man plays the accordion", "two dogs on a beach", "harmonica", "zebra"])
def test_scores_equal_the_formula_for_every_item(query):
    docs = [[], [], [], []]
    for r, t in CAPTIONS:
        docs[r] += words(t)
    idx = index()
    got = idx.score_all(idx.queries([query]))[0]
    assert np.allclose(got, [bm25_by_hand(query, docs, r) for r in range(4)], atol=1e-4)
    assert got[3] == 0.0  # no caption, no words


def test_the_exact_word_decides_between_near_paraphrases():
    idx = index()
    scores = idx.score_all(idx.queries(["someone plays an accordion", "someone plays a harmonica"]))
    assert scores[0].argmax() == 0 and scores[1].argmax() == 1


def test_candidate_scores_are_the_full_scores_gathered():
    idx = index()
    q = idx.queries(["a man plays the accordion", "two dogs", "nothing known"])
    rows = np.array([[2, 0, 1], [3, 2, 2], [0, 1, 2]])
    assert np.allclose(idx.score(q, rows), np.take_along_axis(idx.score_all(q), rows, 1))
    assert (idx.score(q, rows)[2] == 0).all()


def test_leave_one_out_scores_a_caption_against_the_rest_of_its_item():
    idx = index()
    caption = CAPTIONS[0][1]
    loo = idx.leave_one_out([caption], np.array([0]))[0]
    rest = words(CAPTIONS[1][1])  # item 0 without the left-out caption
    n, mean = 3, idx.mean_length
    expected = 0.0
    for w in set(words(caption)):
        tf = rest.count(w)
        if tf:
            col = np.searchsorted(idx.vocab, term_hash(w))
            expected += idx.idf[col] * tf * (K1 + 1) / (tf + K1 * (1 - B + B * len(rest) / mean))
    assert n == int((idx.length > 0).sum())
    assert loo == pytest.approx(expected, rel=1e-5)
    assert 0 < loo < idx.score_all(idx.queries([caption]))[0, 0]  # less than meeting itself


def test_stored_lists_round_trip():
    terms = index().items
    again = ItemTerms.from_lists(*terms.as_lists(np.arange(len(terms))))
    assert np.array_equal(again.indptr, terms.indptr) and np.array_equal(again.terms, terms.terms)
    assert np.array_equal(again.counts, terms.counts)
    with pytest.raises(ValueError, match="counts"):
        ItemTerms.from_lists([[1, 2]], [[1]])


def test_an_index_without_any_words_scores_zero():
    idx = TermIndex(ItemTerms.from_lists([[], []], [[], []]))
    assert idx.score(idx.queries(["a dog"]), np.array([[0, 1]])).tolist() == [[0.0, 0.0]]


def test_rows_from_segments_take_the_last_segment_of_a_row():
    flat_terms, flat_counts = np.arange(10, 20), np.arange(1, 11)
    # segments: row 2 <- [0:3], row 0 <- [3:5], row 2 <- [5:6] (wins), unknown item (-1) <- [6:10]
    terms = ItemTerms.from_segments(4, np.array([2, 0, 2, -1]), np.array([0, 3, 5, 6]), np.array([3, 2, 1, 4]),
                                    flat_terms, flat_counts)
    assert terms.indptr.tolist() == [0, 2, 2, 3, 3]
    assert terms.row(0)[0].tolist() == [13, 14] and terms.row(2)[0].tolist() == [15]
    assert terms.row(2)[1].tolist() == [6] and len(terms.row(1)[0]) == 0 and len(terms.row(3)[0]) == 0
