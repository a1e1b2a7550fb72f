"""Words, sentence templates and facet frequencies of the synthetic world (data only).

Everything lower-case; punctuation is a separate word. Every response word belongs to
exactly one list below, so a word's grammatical class and its meaning (polarity,
topic, attribute) can be looked up from the word alone: that is what lets the gold
scorer in `world.py` work on integer id matrices with numpy.

In templates, capital letters are slots:
  P product (optionally preceded by the prompt's modifier, see `PRODUCT_SLOT_M`),
  A attribute, J adjective (positive, neutral or negative), V adverb.
Every other token is a literal word.
"""
from dataclasses import dataclass

PRODUCTS = (
    "kettle", "lamp", "chair", "phone", "laptop", "bike", "camera", "blender",
    "toaster", "backpack", "jacket", "tent", "watch", "speaker", "keyboard", "mouse",
    "monitor", "printer", "router", "heater", "fan", "mixer", "drill", "vacuum",
    "mattress", "pillow", "stroller", "scooter", "guitar", "tablet", "headset",
    "charger", "microwave", "fridge", "oven", "sofa", "desk", "umbrella", "wallet",
    "helmet",
)
ATTRIBUTES = (
    "price", "battery", "design", "size", "weight", "sound", "screen", "color",
    "material", "handle", "motor", "speed", "comfort", "warranty", "setup", "finish",
)
POSITIVE = (
    "great", "excellent", "superb", "lovely", "solid", "reliable", "fantastic",
    "wonderful", "sturdy", "perfect", "brilliant", "impressive", "amazing", "awesome",
    "outstanding", "delightful",
)
NEGATIVE = (
    "bad", "poor", "flimsy", "awful", "terrible", "weak", "disappointing", "broken",
    "faulty", "clumsy", "dreadful", "mediocre", "horrible", "useless", "fragile",
    "annoying",
)
NEUTRAL = ("okay", "fine", "average", "normal", "acceptable", "standard", "usual", "plain")
ADVERBS = ("really", "very", "quite", "truly", "rather", "so")
# Modifiers only appear in front of a product ("the blue kettle"); they carry no score.
MODIFIERS = ("red", "blue", "black", "white", "small", "large", "new", "old")

# --- prompts: a product (maybe with a modifier) and the attribute asked about -------
PROMPTS = (
    "how is the A of the P ?",
    "tell me about the P and its A .",
    "write a short review of the P , mention the A .",
    "is the P worth it ? i care about the A .",
    "review the P for me , focus on the A .",
    "what do you think of the A of the P ?",
)

# --- responses: 2-5 sentences drawn from these groups ---------------------------------
OPINION = (
    "the P is J .",
    "the P is V J .",
    "i think the P is J .",
    "this P is J and J .",
    "the P is J and J .",
)
OPINION_NO_TOPIC = ("it is J .", "it is V J .")  # an answer that never names the product
ATTRIBUTE = (
    "the A is J .",
    "the A is V J .",
    "its A is J .",
    "its A is V J .",
    "the A is J and J .",
)
FILLER = (
    "i bought it last week .",
    "i bought it last month .",
    "i use it every day .",
    "it arrived on time .",
    "my family uses it .",
    "it works as expected .",
)
CLOSING_POSITIVE = ("hope this helps .", "i recommend it .", "that is all .")
CLOSING_NEGATIVE = ("hope this helps .", "i would not buy it again .", "that is all .")

# Where "P" may be written as "M P" ("the blue kettle is great ."); only these
# two-word contexts, so the bigram grammar needs "the M", "this M" and "M P".
PRODUCT_SLOT_M = ("the", "this")


# --- how often each facet varies: demonstrations vs the pretraining corpus ---------
@dataclass(frozen=True)
class Style:
    """Probabilities of each facet; demonstrations and the corpus differ only here."""
    p_topic: float      # name the prompt's product ...
    p_other: float      # ... or another product (else neither: "it is great .")
    p_attr: float       # talk about the asked attribute ...
    p_other_attr: float  # ... or another one (else skip the attribute sentence)
    pos_range: tuple    # per-response P(adjective is positive) ~ U(pos_range)
    p_neg: float        # P(negative | not positive); otherwise neutral
    p_filler: float
    p_close: float
    p_swap: float = 0.0     # attribute sentence first
    p_repeat: float = 0.0   # the rare facets: repeated sentence/word,
    p_garble: float = 0.0   # shuffled or stray words,
    p_trunc: float = 0.0    # cut off mid-sentence,
    p_long: float = 0.0     # 2-3 extra sentences


# Demonstrations: always on topic and on the asked attribute, fluent, finished, never
# repeated or over-long; they vary in sentiment (what a reward model will learn).
DEMO = Style(p_topic=1.0, p_other=0.0, p_attr=1.0, p_other_attr=0.0, pos_range=(0.5, 1.0),
             p_neg=0.3, p_filler=0.4, p_close=0.7)
# Pretraining corpus: every facet varies, so the LM knows the whole language.
MIXED = Style(p_topic=0.85, p_other=0.08, p_attr=0.75, p_other_attr=0.12,
              pos_range=(0.0, 1.0), p_neg=0.6, p_filler=0.5, p_close=0.5, p_swap=0.2,
              p_repeat=0.05, p_garble=0.03, p_trunc=0.06, p_long=0.03)
