"""The phrase a sentence asks segq to segment, by a small fixed grammar:
what VLM Run's documented usage sends ("Segment all the cars in this
image") becomes SAM 3's text prompt ("car"). segq runs no language model,
so a sentence outside the grammar is refused with what it understands,
never guessed at.

    sentence   := [please] [verb] [quantifier] phrase [place] [. or !]
    verb       := segment | find | mask | detect | locate | outline
    quantifier := all [of] [the] | every | each | the | a | an
    place      := in (this | the) (image | picture | photo)
    phrase     := 1 to 6 words of letters, digits, ' or -, none of them a
                  word of the grammar itself or a pronoun

Case and spaces do not matter. The phrase's last word (its head noun) is
brought to the singular: "red cars" asks for "red car", "people" for
"person"."""

from __future__ import annotations

import re

VERBS = ("segment", "find", "mask", "detect", "locate", "outline")
QUANTIFIERS = ("all of the", "all the", "all of", "all", "every", "each", "the", "a", "an")
MAX_PHRASE_WORDS = 6
#: Words that make a text a sentence about the image, not a noun phrase.
NOT_IN_A_PHRASE = frozenset(
    {*VERBS, "all", "every", "each", "the", "a", "an", "this", "these", "that", "those"}
    | {"in", "image", "picture", "photo", "please", "me", "you", "i", "it", "is", "are"}
    | {"what", "where", "how", "which", "who", "why", "there", "my", "your", "and", "or"}
)
#: Plurals no suffix rule undoes; each maps to its singular.
IRREGULAR_PLURALS = {
    "people": "person",
    "men": "man",
    "women": "woman",
    "children": "child",
    "mice": "mouse",
    "geese": "goose",
    "feet": "foot",
    "teeth": "tooth",
    "knives": "knife",
    "leaves": "leaf",
    "wolves": "wolf",
    "shelves": "shelf",
    "tomatoes": "tomato",
    "potatoes": "potato",
    "buses": "bus",
    "cookies": "cookie",
    "movies": "movie",
}
#: Words that end in s in the singular too.
SINGULAR_ENDINGS = ("ss", "us", "is", "sheep", "fish", "deer", "series", "species")

_SENTENCE = re.compile(
    rf"^(?:please\s+)?(?:(?:{'|'.join(VERBS)})\s+)?"
    rf"(?:(?:{'|'.join(QUANTIFIERS)})\s+)?"
    r"(?P<phrase>.+?)"
    r"(?:\s+in\s+(?:this|the)\s+(?:image|picture|photo))?\s*[.!]?$"
)
_WORD = re.compile(r"^[a-z0-9][a-z0-9'-]*$")

UNDERSTOOD = (
    'segq understands a noun phrase ("car", "red cars"), optionally after '
    f'one of {", ".join(VERBS)}, with all/every/the and "in this image" around it '
    '("Segment all the cars in this image")'
)


class PhraseNotUnderstood(ValueError):
    """The text is outside the grammar; the message says what is understood."""


def requested_phrase(text: str) -> str:
    """The singular noun phrase ``text`` asks for; raises PhraseNotUnderstood."""
    sentence = " ".join(text.lower().split())
    found = _SENTENCE.match(sentence)
    words = found["phrase"].split() if found else []
    if (
        not words
        or len(words) > MAX_PHRASE_WORDS
        or not all(_WORD.match(word) for word in words)
        or any(word in NOT_IN_A_PHRASE for word in words)
    ):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise PhraseNotUnderstood(f"{UNDERSTOOD}; not {shown!r}")
    return " ".join([*words[:-1], singular(words[-1])])


def singular(word: str) -> str:
    """An English noun in the singular, by the common rules (lowercase)."""
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if word.endswith(SINGULAR_ENDINGS) or not word.endswith("s") or len(word) < 3:
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "shes", "ches", "xes", "zes")):
        return word[:-2]
    return word[:-1]
