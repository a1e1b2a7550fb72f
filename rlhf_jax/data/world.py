"""A synthetic review world whose programmatic gold scorer plays the human annotators.

Prompts ask about one attribute of one product ("how is the price of the blue kettle ?");
responses are 2-5 short sentences from a regular grammar (`world_grammar.py`), e.g.
"the kettle is really great . its price is okay . hope this helps .". About 165 words
(144 in responses), so a few-million-parameter transformer learns it in minutes on a CPU.

Gold score (deterministic; the world's "true human preference"):

    gold = topic - off_topic + 0.5 * attribute + positive - negative
           - 2.0 * (1 - fluency) - 0.5 * repeats - 0.1 * max(0, n_words - 25)
           - 0.5 * (1 - ended)

  topic      1 if the response names the prompt's product, else 0
  off_topic  1 if it names any other product
  attribute  1 if it names the attribute the prompt asked about
  positive   min(#distinct positive adjectives, 3) / 3   (repeats earn nothing)
  negative   min(#distinct negative adjectives, 3) / 3
  fluency    fraction of word transitions (start->w1, w1->w2, ...) that the grammar
             allows; unknown words allow none, so garbage -> 0
  repeats    occurrences of a product/attribute/adjective/adverb already used
  n_words    whitespace-separated words
  ended      1 if the last word is "." (a finished sentence) and, when the optional
             `ended` array is given, the sampler also emitted EOS (not truncated)

Best possible gold is 2.5; an empty response scores -2.5.

Over-optimisation by design (Gao et al. 2022, "Scaling laws for reward model
over-optimization"): demonstrations (`make_sft`) always stay on topic, never repeat,
stay within 25 words and end properly, and differ mostly in how many positive
adjectives they use. A reward model trained on comparisons of such responses learns
"more positive words => better", but cannot learn the repetition, fluency and length
penalties because those facets almost never vary in its data. A policy that spams
"great great excellent ..." raises that proxy while gold falls
(tests/test_world.py::test_overoptimisation_of_a_bag_of_words_proxy shows it).

Simulated annotators (`annotate`): Plackett-Luce rankings of K responses via the
Gumbel-max trick; for K=2 this is Bradley-Terry, P(a > b) = sigmoid((g_a - g_b) / T).

Splits are reproducible from a seed; each maker mixes its own tag into the seed, so
e.g. make_prompts(0, n) and make_sft(0, n) are different streams.
"""
import functools
import random
from typing import Optional, Sequence

import numpy as np

from rlhf_jax.data import world_grammar as g

# The pipeline formats every pretraining document, demonstration and prompt the same
# way, so the language model learns where a response starts.
SEP = " => "


def format_example(prompt: str, response: str) -> str:
    return prompt + SEP + response


# ---------------------------------------------------------------------------------
# Vocabulary tables for the vectorised scorer: word -> id -> (class, meaning).
# ---------------------------------------------------------------------------------
_SLOTS = {"P": g.PRODUCTS, "A": g.ATTRIBUTES, "J": g.POSITIVE + g.NEUTRAL + g.NEGATIVE,
          "V": g.ADVERBS, "M": g.MODIFIERS}
_RESPONSE_TEMPLATES = (g.OPINION + g.OPINION_NO_TOPIC + g.ATTRIBUTE + g.FILLER
                       + g.CLOSING_POSITIVE + g.CLOSING_NEGATIVE)


def _grammar_sequences():
    """Every template as a class sequence, plus the "the M P" variants."""
    for t in _RESPONSE_TEMPLATES:
        toks = t.split()
        yield toks
        if any(a in g.PRODUCT_SLOT_M and b == "P" for a, b in zip(toks, toks[1:])):
            i = toks.index("P")
            yield toks[:i] + ["M"] + toks[i:]


_LITERALS = sorted({w for t in _RESPONSE_TEMPLATES for w in t.split() if w not in _SLOTS})
PAD_ID, UNK_ID = 0, 1
_WORDS = ["<pad>", "<unk>"] + [w for s in "PAJVM" for w in _SLOTS[s]] + _LITERALS


class _Vocab(dict):
    def __missing__(self, word):  # any word outside the grammar (garbage) is UNK
        return UNK_ID


_ID = _Vocab((w, i) for i, w in enumerate(_WORDS))
assert len(_ID) == len(_WORDS), "a word appears in two lists of world_grammar"
_ROW_END = _ID["\0"] = -1  # row separator used by _word_ids, never a real word

_CLASSES = ["<pad>", "<unk>", "<bos>"] + list(_SLOTS) + _LITERALS
_CLS = {c: i for i, c in enumerate(_CLASSES)}
_WORD_CLASS = np.array([_CLS["<pad>"], _CLS["<unk>"]]
                       + [_CLS[s] for s in "PAJVM" for _ in _SLOTS[s]]
                       + [_CLS[w] for w in _LITERALS], np.int32)
_ALLOWED = np.zeros((len(_CLASSES), len(_CLASSES)), bool)  # [previous, next]
for _seq in _grammar_sequences():
    _c = [_CLS["<bos>"]] + [_CLS[w] for w in _seq]
    _ALLOWED[_c[:-1], _c[1:]] = True
    _ALLOWED[_CLS["."], _c[1]] = True  # a new sentence may follow any full stop


def _mask(words):
    m = np.zeros(len(_WORDS), bool)
    m[[_ID[w] for w in words]] = True
    return m


_IS_POS, _IS_NEG, _IS_PRODUCT = _mask(g.POSITIVE), _mask(g.NEGATIVE), _mask(g.PRODUCTS)
_IS_CONTENT = _mask(g.PRODUCTS + g.ATTRIBUTES + _SLOTS["J"] + g.ADVERBS)
_PERIOD_ID = _ID["."]
_PRODUCT_SET, _ATTR_SET, _MOD_SET = set(g.PRODUCTS), set(g.ATTRIBUTES), set(g.MODIFIERS)
MAX_WORDS = 128  # facets look at the first MAX_WORDS words; n_words counts them all
# gold = sum(WEIGHTS[k] * term[k]); the terms are built from the facets in gold_score.
WEIGHTS = dict(topic=1.0, off_topic=-1.0, attribute=0.5, positive=1.0, negative=-1.0,
               disfluency=-2.0, repeats=-0.5, overlength=-0.1, unfinished=-0.5)
LENGTH_LIMIT = 25
VOCABULARY = tuple(_WORDS[2:])  # every word a grammatical response can use

# ---------------------------------------------------------------------------------
# Gold scorer
# ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1 << 16)
def _prompt_info(prompt: str):
    """(product, attribute, modifier) named in a prompt; None where absent."""
    words = prompt.split()
    prod = next((i for i, w in enumerate(words) if w in _PRODUCT_SET), None)
    attr = next((w for w in words if w in _ATTR_SET), None)
    mod = words[prod - 1] if prod and words[prod - 1] in _MOD_SET else None
    return (None if prod is None else words[prod]), attr, mod


def _word_ids(responses: Sequence[str]):
    """[N, L] int32 word ids (PAD right), true word counts, id of each last word."""
    # One join + split + C-level dict map over all words is ~3x faster than splitting
    # row by row; a "\0" word ends each row (garbage containing "\0" is escaped).
    text = " \0 ".join(responses) + " \0"
    if text.count("\0") != len(responses):
        text = " \0 ".join(r.replace("\0", "\1") for r in responses) + " \0"
    words = text.split()
    flat = np.fromiter(map(_ID.__getitem__, words), np.int32, len(words))
    ends = np.flatnonzero(flat == _ROW_END)
    lens = np.diff(ends, prepend=-1) - 1
    flat = flat[flat != _ROW_END]
    ends = np.cumsum(lens)
    last = np.where(lens > 0, flat[np.maximum(ends - 1, 0)] if flat.size else 0, PAD_ID)
    width = int(min(max(lens.max(initial=0), 1), MAX_WORDS))
    rows = np.repeat(np.arange(len(lens)), lens)
    cols = np.arange(flat.size) - np.repeat(ends - lens, lens)
    keep = cols < width
    ids = np.zeros((len(lens), width), np.int32)
    ids[rows[keep], cols[keep]] = flat[keep]
    return ids, lens, last


def gold_facets(prompts: Sequence[str], responses: Sequence[str],
                ended: Optional[np.ndarray] = None) -> dict:
    """Per-response facets of the gold score (float32 arrays of shape [N])."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    # Prompts repeat (K samples each), so parse each distinct prompt once.
    index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    table = np.array([[_ID.get(x, -1) for x in _prompt_info(p)[:2]] for p in index] or
                     np.zeros((0, 2)), np.int32)
    rows = table[np.fromiter(map(index.__getitem__, prompts), np.int64, len(prompts))]
    want_prod, want_attr = rows[:, :1], rows[:, 1:]
    ids, lens, last = _word_ids(responses)
    valid = ids != PAD_ID
    cls = _WORD_CLASS[ids]
    prev = np.concatenate([np.full((len(ids), 1), _CLS["<bos>"], np.int32), cls[:, :-1]], 1)
    n_seen = valid.sum(1)
    ok = (_ALLOWED[prev, cls] & valid).sum(1)
    # Sorting each row puts equal ids next to each other: "new" marks first occurrences.
    srt = np.sort(ids, axis=1)
    new = np.ones_like(valid)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    finished = last == _PERIOD_ID
    if ended is not None:
        finished &= np.asarray(ended, bool).reshape(-1)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return dict(
        topic=f32((ids == want_prod).any(1)),
        off_topic=f32((_IS_PRODUCT[ids] & (ids != want_prod)).any(1)),
        attribute=f32((ids == want_attr).any(1)),
        positive=f32(np.minimum((_IS_POS[srt] & new).sum(1), 3) / 3),
        negative=f32(np.minimum((_IS_NEG[srt] & new).sum(1), 3) / 3),
        fluency=f32(ok / np.maximum(n_seen, 1)),
        repeats=f32((_IS_CONTENT[srt] & ~new).sum(1)),
        n_words=f32(lens),
        ended=f32(finished),
    )


def gold_score(prompts: Sequence[str], responses: Sequence[str],
               ended: Optional[np.ndarray] = None) -> np.ndarray:
    """Gold score per (prompt, response), float32 [N]; formula in the module docstring.

    `ended[i]` (optional) says whether the sampler emitted EOS; False scores the
    response as unfinished even if its text ends with ".".
    """
    f = gold_facets(prompts, responses, ended)
    terms = dict(f, disfluency=1 - f["fluency"], unfinished=1 - f["ended"],
                 overlength=np.maximum(f["n_words"] - LENGTH_LIMIT, 0))
    gold = sum(w * terms[k] for k, w in WEIGHTS.items())
    return gold.astype(np.float32)


# ---------------------------------------------------------------------------------
# Simulated annotators
# ---------------------------------------------------------------------------------


def annotate(scores: np.ndarray, rng: np.random.Generator, temperature: float,
             flip_rate: float = 0.0) -> np.ndarray:
    """Noisy rankings of K responses per prompt: int [N, K], rank 0 = best.

    Sorting scores / temperature + Gumbel(0, 1) noise samples a Plackett-Luce ranking
    (the Gumbel-max trick applied position by position); for K=2 it is Bradley-Terry,
    P(a ranked above b) = sigmoid((score_a - score_b) / temperature). temperature=0
    gives the exact gold order (ties go to the lower index); large temperatures
    approach uniformly random rankings. With probability `flip_rate` per prompt the
    whole ranking is reversed (a label flip for K=2): an annotator who misread the task.
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, K], got shape {scores.shape}")
    if temperature < 0 or not 0 <= flip_rate <= 1:
        raise ValueError(f"need temperature >= 0 and 0 <= flip_rate <= 1, got "
                         f"{temperature}, {flip_rate}")
    n, k = scores.shape
    keys = scores if temperature == 0 else scores / temperature + rng.gumbel(size=(n, k))
    order = np.argsort(-keys, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(k), (n, k)), axis=1)
    flip = rng.random(n) < flip_rate
    ranks[flip] = k - 1 - ranks[flip]
    return ranks


# ---------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------


_SPLIT_TAG = dict(prompts=1, sft=2, corpus=3, demo=4, mixed=5)


def _compile(templates):
    """'the P is J and J .' -> ('the {P} is {} and {} .', #adjectives)."""
    out = []
    for t in templates:
        toks = t.split()
        fmt = " ".join("{}" if w == "J" else "{%s}" % w if w in _SLOTS else w for w in toks)
        out.append((fmt, toks.count("J")))
    return tuple(out)


_T = {name: _compile(getattr(g, name)) for name in (
    "PROMPTS", "OPINION", "OPINION_NO_TOPIC", "ATTRIBUTE", "FILLER",
    "CLOSING_POSITIVE", "CLOSING_NEGATIVE")}


def _rand(seed: int, split: str) -> random.Random:
    # numpy seeds the stream (reproducible, split-specific); Python's Random draws the
    # scalars because it is ~20x faster per call, which keeps generation >20k docs/s.
    rng = np.random.default_rng([int(seed), _SPLIT_TAG[split]])
    return random.Random(int(rng.integers(2**62)))


def _pick(r, seq):
    return seq[int(r.random() * len(seq))]


def _prompt(r):
    prod, attr = _pick(r, g.PRODUCTS), _pick(r, g.ATTRIBUTES)
    mod = _pick(r, g.MODIFIERS) if r.random() < 0.5 else None
    fmt, _ = _pick(r, _T["PROMPTS"])
    return fmt.format(P=f"{mod} {prod}" if mod else prod, A=attr), prod, attr, mod


def _response(r, prod, attr, mod, s: g.Style) -> str:
    rand = r.random
    p_pos = s.pos_range[0] + (s.pos_range[1] - s.pos_range[0]) * rand()
    used = set()

    def adjectives(n):
        out = []
        for _ in range(n):
            pool = g.POSITIVE if rand() < p_pos else g.NEGATIVE if rand() < s.p_neg else g.NEUTRAL
            i = int(rand() * len(pool))
            for _ in range(len(pool)):  # distinct adjectives: repetition stays rare
                if pool[i] not in used:
                    break
                i = (i + 1) % len(pool)
            used.add(pool[i])
            out.append(pool[i])
        return out

    def sentence(group, **slots):
        fmt, n_adj = _pick(r, _T[group])
        if "{V}" in fmt:
            slots["V"] = _pick(r, [a for a in g.ADVERBS if a not in used] or g.ADVERBS)
            used.add(slots["V"])
        return fmt.format(*adjectives(n_adj), **slots)

    u = rand() if prod else 1.0  # a prompt without a product gets "it is ..."
    if u < s.p_topic:
        name = f"{mod} {prod}" if mod and rand() < 0.5 else prod
        sents = [sentence("OPINION", P=name)]
    elif u < s.p_topic + s.p_other:
        sents = [sentence("OPINION", P=_pick(r, [p for p in g.PRODUCTS if p != prod]))]
    else:
        sents = [sentence("OPINION_NO_TOPIC")]
    u = rand()
    if u < s.p_attr + s.p_other_attr:
        a = attr if u < s.p_attr and attr else _pick(r, [x for x in g.ATTRIBUTES if x != attr])
        sents.insert(0 if rand() < s.p_swap else 1, sentence("ATTRIBUTE", A=a))
    if rand() < s.p_long:  # 2-3 more attribute sentences, about attributes not asked for
        others = [x for x in g.ATTRIBUTES if x != attr]
        for a in others[int(rand() * (len(others) - 3)):][:2 + int(rand() * 2)]:
            sents.append(sentence("ATTRIBUTE", A=a))
    if rand() < s.p_filler:
        sents.append(sentence("FILLER"))
    if rand() < s.p_close:
        sents.append(sentence("CLOSING_POSITIVE" if p_pos >= 0.5 else "CLOSING_NEGATIVE"))
    if rand() < s.p_repeat:
        if rand() < 0.5:
            sents.append(_pick(r, sents))
        else:
            words = sents[0].split()
            i = int(rand() * (len(words) - 1))
            sents[0] = " ".join(words[:i + 1] + words[i:])
    if rand() >= s.p_garble + s.p_trunc:
        return " ".join(sents)
    words = " ".join(sents).split()
    if rand() < s.p_garble / (s.p_garble + s.p_trunc):
        i, j = int(rand() * len(words)), int(rand() * len(words))
        if rand() < 0.5:
            words[i], words[j] = words[j], words[i]
        else:
            words.insert(i, _pick(r, VOCABULARY))
        return " ".join(words)
    return " ".join(words[:1 + int(rand() * (len(words) - 1))])


def make_prompts(seed: int, n: int) -> list:
    """n prompts for RL / reward labelling / evaluation (one seed per split)."""
    r = _rand(seed, "prompts")
    return [_prompt(r)[0] for _ in range(n)]


def make_sft(seed: int, n: int) -> list:
    """n (prompt, good response) demonstrations: on topic, fluent, finished."""
    r = _rand(seed, "sft")
    out = []
    for _ in range(n):
        p, prod, attr, mod = _prompt(r)
        out.append((p, _response(r, prod, attr, mod, g.DEMO)))
    return out


def make_corpus(seed: int, n_docs: int) -> list:
    """n_docs pretraining documents `format_example(prompt, response)` of mixed
    quality (off-topic, negative, repeated, garbled, truncated, over-long ones too)."""
    r = _rand(seed, "corpus")
    out = []
    for _ in range(n_docs):
        p, prod, attr, mod = _prompt(r)
        out.append(format_example(p, _response(r, prod, attr, mod, g.MIXED)))
    return out


def make_responses(seed: int, prompts: Sequence[str], kind: str = "demo") -> list:
    """One generated response per prompt; kind "demo" (as make_sft) or "mixed"
    (as make_corpus). Prompts the world cannot parse get off-topic answers."""
    if kind not in ("demo", "mixed"):
        raise ValueError(f"kind must be 'demo' or 'mixed', got {kind!r}")
    r, style = _rand(seed, kind), g.DEMO if kind == "demo" else g.MIXED
    return [_response(r, *_prompt_info(p), style) for p in prompts]
