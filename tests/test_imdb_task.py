"""The built-in imdb-sentiment task: the data, the gold reward, its token credit, Bradley-Terry labels."""

import numpy as np
import pytest

from r2q.errors import UserError
from r2q.tasks.imdb_sentiment import (
    GoldReward,
    bradley_terry_pairs,
    extreme_pairs,
    load_gold,
    load_reviews,
    rt_pairs,
    save_gold,
    spearman,
    split_reviews,
)


@pytest.fixture(scope="module")
def gold():
    reviews = load_reviews("imdb")
    assert len(reviews) == 25000 and {y for _, y in reviews} == {0, 1}
    assert not any("<br" in t for t, _ in reviews[:200])
    splits = split_reviews(reviews, n_gold=3000, n_prompts=10, seed=0)
    assert len(splits.gold) == 3000 and len(splits.prompts) == 10
    assert not set(splits.prompts) & set(splits.lm)
    return GoldReward(splits.gold)


def test_gold_reward_is_a_sentiment_classifier(gold):
    assert gold.test_accuracy > 0.8
    r = gold(["a wonderful, moving film with great acting", "a boring, awful waste of time"])
    assert r[0] > 0 > r[1]
    assert gold.weights["great"] > 0 > gold.weights["awful"]


def test_token_weights_follow_words(gold):
    pieces = ["It", " was", " gre", "at", "!", " aw", "ful"]
    w = gold.token_weights(pieces)
    assert len(w) == len(pieces)
    assert w[2] == w[3] == pytest.approx(gold.weights["great"])  # both pieces of "great"
    assert w[4] == 0.0  # punctuation is in no word
    assert w[5] == w[6] == pytest.approx(gold.weights["awful"])


def test_gold_saves_as_json_and_scores_the_same(gold, tmp_path):
    save_gold(gold, tmp_path / "gold.json")
    again = load_gold(tmp_path / "gold.json")
    texts = ["not bad at all, quite fun", "the worst plot", "an ok movie"]
    np.testing.assert_allclose(again(texts), gold(texts), rtol=1e-10)
    assert again.weights == pytest.approx(gold.weights)


def test_bradley_terry_labels_follow_the_reward_gap():
    n = 4000
    prompts = ["p"] * n
    rows = bradley_terry_pairs(prompts, ["good"] * n, ["bad"] * n, np.full(n, 1.0), np.zeros(n), seed=3)
    frac = np.mean([r["chosen"] == "good" for r in rows])
    assert frac == pytest.approx(1 / (1 + np.exp(-1.0)), abs=0.025)
    assert all(r["gold_chosen"] == (1.0 if r["chosen"] == "good" else 0.0) for r in rows)
    assert bradley_terry_pairs(["p"], ["same"], ["same"], np.zeros(1), np.zeros(1)) == []


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_extreme_pairs_take_best_and_worst_of_k_and_keep_eos_flags():
    texts = ["a", "b", "c", "d", "x", "x"]
    scores = np.array([0.0, 3.0, -2.0, 1.0, 5.0, 5.0])
    ended = [True, False, True, False, True, True]
    rows = extreme_pairs(["p", "q"], texts, ended, scores, 3, seed=0)
    # prompt p: samples a, b, c -> best b (gold 3, cut at the cap), worst c (gold -2, ended)
    assert len(rows) == 2
    r = rows[0]
    assert {r["chosen"], r["rejected"]} == {"b", "c"}
    eos = {r["chosen"]: r["chosen_eos"], r["rejected"]: r["rejected_eos"]}
    assert eos == {"b": False, "c": True}
    assert {r["gold_chosen"], r["gold_rejected"]} == {3.0, -2.0}
    # prompt q: samples d, x, x -> best x, worst d
    assert {rows[1]["chosen"], rows[1]["rejected"]} == {"x", "d"}


def test_rt_pairs_pair_a_positive_with_a_negative_snippet():
    snippets = [(f"good {i}", 1) for i in range(50)] + [(f"bad {i}", 0) for i in range(50)]
    pairs = rt_pairs(snippets, 40, seed=1)
    assert len(pairs) == 40
    assert all({x["a"].split()[0], x["b"].split()[0]} == {"good", "bad"} for x in pairs)
    assert 5 < sum(x["a"].startswith("good") for x in pairs) < 35  # order is random
    with pytest.raises(UserError, match="Rotten Tomatoes"):
        rt_pairs(snippets, 51)


def test_passages_are_runs_of_whole_sentences_that_fit():
    import random

    from r2q.tasks.imdb_sentiment import passages, sentences

    text = ("One. Two two. Three three three! Four four four four? " + " ".join(["long"] * 40) + ". Six. Seven seven. "
            "Eight.")
    assert sentences(text)[:4] == ["One.", "Two two.", "Three three three!", "Four four four four?"]

    def n_words(s: str) -> int:
        return len(s.split())

    for seed in range(20):
        ps = passages(text, n_words, 9, random.Random(seed), (2, 3))
        sents = sentences(text)
        for p in ps:
            parts = sentences(p)
            assert 2 <= len(parts) <= 3 and n_words(p) <= 9  # whole sentences, within the budget
            i = sents.index(parts[0])
            assert sents[i : i + len(parts)] == parts  # consecutive, in order
        assert not any("long" in p for p in ps)  # a sentence that cannot fit is dropped
    counts = {len(sentences(p)) for seed in range(20) for p in passages(text, n_words, 99, random.Random(seed))}
    assert counts == {2, 3, 4}  # the number of sentences varies: where a passage ends is not set by its length


def test_gold_counted_once_is_not_raised_by_repetition(gold):
    once, twice = "a great film.", "a great film. a great film. great great great film."
    assert gold([twice])[0] > gold([once])[0]  # the plain TF-IDF logit rewards repeating a positive word
    assert gold.once([twice])[0] == pytest.approx(gold.once([once])[0])
    assert gold.once([once])[0] == pytest.approx(gold([once])[0])  # no word repeats: the same number
