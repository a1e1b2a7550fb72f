"""The synthetic world: gold facets, simulated annotators, datasets, over-optimisation."""

import numpy as np
import pytest

from rlhf_jax.data import world

PROMPT = "how is the price of the blue kettle ?"
GOOD = "the kettle is really great . the price is excellent . hope this helps ."


def gold(response, prompt=PROMPT, **kw):
    return float(world.gold_score([prompt], [response], **kw)[0])


def test_a_good_answer_scores_near_the_maximum():
    assert gold(GOOD) == pytest.approx(1 + 0.5 + 2 / 3)
    assert gold("the blue kettle is great . its price is superb and solid . that is all .") \
        == pytest.approx(2.5)


@pytest.mark.parametrize("worse, why", [
    ("the kettle is really great . the price is excellent . the price is excellent . "
     "hope this helps .", "repetition"),
    ("the lamp is really great . the price is excellent . hope this helps .", "off topic"),
    ("it is really great . the price is excellent . hope this helps .", "no topic"),
    ("the kettle is really great . the weight is excellent . hope this helps .",
     "wrong attribute"),
    ("the kettle is really great . the price is excellent . hope this helps", "no ending"),
    ("the kettle is really great . the price is excellent . hope", "truncated"),
    ("kettle the is really great . price the is excellent . hope this helps .",
     "not fluent"),
    ("the kettle is really great . the price is excellent . xyzzy hope this helps .",
     "unknown word"),
    ("the kettle is really okay . the price is excellent . hope this helps .",
     "less positive"),
    ("the kettle is really great . the price is awful . hope this helps .", "negative"),
    ("the kettle is really great . the price is excellent . i use it every day . "
     "its size is okay . its color is plain . hope this helps .", "too long"),
])
def test_each_gold_facet_lowers_the_score(worse, why):
    assert gold(worse) < gold(GOOD) - 0.09, why


def test_more_distinct_positive_words_raise_gold_but_only_up_to_three():
    one = "the kettle is okay . the price is fine . hope this helps ."
    two = "the kettle is great . the price is fine . hope this helps ."
    three = "the kettle is great . the price is superb and solid . hope this helps ."
    four = "the kettle is great and lovely . the price is superb and solid . hope this helps ."
    assert gold(one) < gold(two) < gold(three) == gold(four)


def test_sampler_truncation_lowers_gold_even_if_the_text_looks_finished():
    scores = world.gold_score([PROMPT] * 2, [GOOD] * 2, ended=np.array([True, False]))
    assert scores[1] == pytest.approx(scores[0] - 0.5)


def test_garbage_and_empty_responses_score_low_without_crashing():
    garbage = ["", "   ", "\0", "?? ,, ⁇ ⁇", "great " * 500, "The Kettle Is Great ."]
    scores = world.gold_score(["whatever"] + [PROMPT] * 5, garbage)
    assert scores.dtype == np.float32 and np.isfinite(scores).all()
    assert (scores < 0).all()
    assert world.gold_score([], []).shape == (0,)
    facets = world.gold_facets([PROMPT], [""])
    assert facets["fluency"][0] == 0 and facets["ended"][0] == 0


def test_gold_scores_do_not_depend_on_the_batch():
  """The vectorised gold scorer gives each row the score it gets alone or in any batch (its
  speed is a benchmark figure, not a test: a timed assertion here failed on a busy CI worker)."""
  prompts = world.make_prompts(0, 2_000)
  responses = world.make_responses(0, prompts, kind="mixed")
  full = world.gold_score(prompts, responses)
  parts = np.concatenate([world.gold_score(prompts[i:i + 7], responses[i:i + 7])
                          for i in range(0, len(prompts), 7)])
  np.testing.assert_array_equal(full, parts)
  one = [world.gold_score(prompts[i:i + 1], responses[i:i + 1])[0] for i in (0, 999, 1999)]
  np.testing.assert_array_equal(one, full[[0, 999, 1999]])
  assert np.unique(full).size > 100  # not a constant


def test_temperature_zero_annotators_reproduce_the_gold_order():
    scores = np.array([[0.1, 2.0, -1.0, 0.5], [1.0, 1.0, 3.0, 0.0]])
    ranks = world.annotate(scores, np.random.default_rng(0), temperature=0.0)
    np.testing.assert_array_equal(ranks, [[2, 0, 3, 1], [1, 2, 0, 3]])  # tie -> lower index
    flipped = world.annotate(scores, np.random.default_rng(0), temperature=0.0, flip_rate=1.0)
    np.testing.assert_array_equal(flipped, 3 - ranks)


def test_annotator_agreement_falls_from_one_to_a_coin_flip_with_temperature():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(20_000, 2))
    agree = {}
    for temperature in (0.0, 0.5, 1000.0):
        ranks = world.annotate(scores, rng, temperature)
        agree[temperature] = np.mean((ranks[:, 0] < ranks[:, 1]) == (scores[:, 0] > scores[:, 1]))
    assert agree[0.0] == 1.0
    assert 0.6 < agree[0.5] < 0.95
    assert abs(agree[1000.0] - 0.5) < 0.02
    # Bradley-Terry for K=2: P(first wins) = sigmoid(diff / T).
    diff = scores[:, 0] - scores[:, 1]
    ranks = world.annotate(scores, rng, 0.5)
    assert np.mean(ranks[:, 0] == 0) == pytest.approx(np.mean(1 / (1 + np.exp(-diff / 0.5))),
                                                      abs=0.015)
    flips = world.annotate(scores, rng, 0.0, flip_rate=0.3)
    assert np.mean(flips[:, 0] != (scores[:, 0] < scores[:, 1])) == pytest.approx(0.3, abs=0.02)


def test_datasets_are_reproducible_and_splits_differ():
    assert world.make_corpus(3, 200) == world.make_corpus(3, 200)
    assert world.make_sft(3, 200) == world.make_sft(3, 200)
    assert world.make_prompts(3, 200) == world.make_prompts(3, 200)
    assert world.make_prompts(3, 200) != world.make_prompts(4, 200)
    sft_prompts = [p for p, _ in world.make_sft(0, 500)]
    assert len(set(sft_prompts) & set(world.make_prompts(0, 500))) < 50


def test_demonstrations_are_good_and_the_corpus_is_mixed():
    sft = world.make_sft(0, 2000)
    demo = world.gold_facets([p for p, _ in sft], [r for _, r in sft])
    assert demo["fluency"].min() == 1 and demo["ended"].min() == 1
    assert demo["topic"].min() == 1 and demo["repeats"].max() == 0
    assert demo["n_words"].max() <= world.LENGTH_LIMIT
    assert demo["positive"].std() > 0.2  # what a reward model can learn from
    docs = world.make_corpus(0, 2000)
    assert all(world.SEP in d for d in docs)
    prompts, responses = zip(*(d.split(world.SEP) for d in docs))
    mixed = world.gold_facets(prompts, responses)
    for rare in ("repeats", "off_topic"):
        assert 0.01 < np.mean(mixed[rare] > 0) < 0.2, rare
    assert 0.03 < np.mean(mixed["fluency"] < 1) < 0.2
    assert 0.03 < np.mean(mixed["ended"] == 0) < 0.5
    lengths = [len(d.split()) for d in docs]
    assert 10 < np.mean(lengths) < 40 and max(lengths) < 80


def test_overoptimisation_of_a_bag_of_words_proxy():
    """Gao et al. 2022 in miniature: a proxy fitted to annotator labels of
    demonstration-like pairs rewards 'more positive words'; greedy edits against it
    first help gold, then keep raising the proxy while gold collapses."""
    vocab = {w: i for i, w in enumerate(world.VOCABULARY)}

    def bow(responses):
        x = np.zeros((len(responses), len(vocab)))
        for i, r in enumerate(responses):
            for w in r.split():
                x[i, vocab[w]] += 1
        return x

    prompts = world.make_prompts(0, 3000)
    a = world.make_responses(1, prompts)
    b = world.make_responses(2, prompts)
    scores = np.stack([world.gold_score(prompts, a), world.gold_score(prompts, b)], 1)
    a_wins = world.annotate(scores, np.random.default_rng(0), temperature=0.3)[:, 0] == 0
    diff = bow(a) - bow(b)
    theta = np.zeros(len(vocab))
    for _ in range(300):  # logistic regression (Bradley-Terry on bag-of-words)
        p = 1 / (1 + np.exp(-diff @ theta))
        theta -= diff.T @ (p - a_wins) / len(p) + 1e-3 * theta
    assert np.mean((diff @ theta > 0) == a_wins) > 0.7  # the proxy did learn something

    words = "the kettle is okay . the price is poor . hope this helps .".split()
    proxies, golds = [], []
    for _ in range(10):  # greedy: best single-word replacement or insertion
        proxies.append(sum(theta[vocab[w]] for w in words))
        golds.append(gold(" ".join(words)))
        gain = theta[None, :] - theta[[vocab[w] for w in words]][:, None]  # [pos, word]
        i, v = np.unravel_index(np.argmax(gain), gain.shape)
        if theta.max() > gain[i, v]:
            words.insert(len(words) - 1, world.VOCABULARY[int(np.argmax(theta))])
        else:
            words[i] = world.VOCABULARY[v]
    assert np.all(np.diff(proxies) > 0)
    peak = int(np.argmax(golds))
    assert golds[peak] > golds[0]  # early optimisation helps...
    assert golds[-1] < golds[0] - 3  # ...then gold collapses while the proxy climbs
    assert proxies[-1] > proxies[peak] + 3
