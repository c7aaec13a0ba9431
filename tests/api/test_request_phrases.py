"""The grammar that reads what a sentence asks segq to segment (VLM Run's
"Segment all the cars in this image"): every form it takes, the singular
it brings the phrase to, and what it refuses rather than guess."""

from __future__ import annotations

import pytest

from segq.api.peers.request_phrases import PhraseNotUnderstood, requested_phrase, singular


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("Segment all the cars in this image", "car"),
        ("segment all the cars in this image.", "car"),
        ("Find every person in the picture!", "person"),
        ("Please mask the red cars", "red car"),
        ("detect all of the traffic lights in this photo", "traffic light"),
        ("Locate each dog", "dog"),
        ("outline a cat", "cat"),
        ("Find all people", "person"),
        ("  CARS  ", "car"),
        ("car", "car"),
        ("red car", "red car"),
        ("wine glasses", "wine glass"),
        ("Segment the boxes", "box"),
        ("Segment all the strawberries", "strawberry"),
        ("segment the bus", "bus"),
        ("segment all the buses", "bus"),
        ("find the sheep", "sheep"),
        ("segment the masks", "mask"),
        ("segment the o'clock-tower", "o'clock-tower"),
    ],
)
def test_what_is_understood(text: str, phrase: str) -> None:
    assert requested_phrase(text) == phrase


@pytest.mark.parametrize(
    "text",
    [
        "Describe this image",
        "What is in this picture?",
        "How many cars are there",
        "count the dogs",
        "segment",
        "find all",
        "Segment all the cars and the dogs",
        "segment the cars, please",
        "one two three four five six seven",
        "",
        "   ",
        "tell me a joke",
        "segment the car in this image in this image",
    ],
)
def test_anything_else_is_refused_saying_what_is_understood(text: str) -> None:
    with pytest.raises(PhraseNotUnderstood) as refused:
        requested_phrase(text)
    message = str(refused.value)
    assert message.startswith('segq understands a noun phrase ("car", "red cars")')
    assert "Segment all the cars in this image" in message


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("cars", "car"),
        ("berries", "berry"),
        ("watches", "watch"),
        ("dishes", "dish"),
        ("glass", "glass"),
        ("cactus", "cactus"),
        ("people", "person"),
        ("knives", "knife"),
        ("shoes", "shoe"),
        ("ties", "tie"),
        ("s", "s"),
        ("car", "car"),
    ],
)
def test_the_head_noun_in_the_singular(word: str, expected: str) -> None:
    assert singular(word) == expected
