"""The built-in imdb-sentiment task: the data, the gold reward, its token credit, Bradley-Terry labels."""

import numpy as np
import pytest

from r2q.tasks.imdb_sentiment import (
    GoldReward,
    bradley_terry_pairs,
    load_gold,
    load_reviews,
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
