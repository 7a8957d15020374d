"""Phrase extraction with the real spaCy model: expected phrases on fixed captions, exact char spans."""

from __future__ import annotations

import pytest

from vesl.errors import UserError
from vesl.labelers.phrases import (
    PAPER_GRAMMAR,
    PhraseStage,
    chunk_tags,
    lower_preserving_length,
    tag_pattern_to_regex,
)
from vesl.schemas.config import PhrasesConfig
from vesl.schemas.stage import Sample

DOG = (
    "A photo of a black dog on the left of the wooden bench and a cat, which is sleeping in the "
    "background. Stock photo, shutterstock image 12345.png"
)
FRUIT = "Two Red Apples and a green pear on a white plate."
TAXI = "A man holding an umbrella stands next to a yellow taxi in the rain."
FIELD = "a dog in a field of flowers"
CITY = "The İstanbul skyline with a tall tower at night, vector illustration."
NONE = "It is what it is."

CAPTIONS = [DOG, FRUIT, TAXI, FIELD, CITY, NONE, ""]

EXPECTED_PAPER = [
    [
        "a black dog",
        "the wooden bench",
        "a cat",
    ],  # "a photo", "the left", "the background", "stock photo" dropped
    ["Red Apples", "a green pear", "a white plate"],  # "Two" is CD, outside <DT>?
    ["A man", "an umbrella", "a yellow taxi", "the rain"],
    ["a dog", "a field", "flowers"],
    ["The İstanbul skyline", "a tall tower", "night"],  # "vector illustration" is generic
    [],
    [],
]
EXPECTED_CHUNKS = [
    ["a black dog", "the wooden bench", "a cat"],  # "which" (pronoun) dropped
    ["Two Red Apples", "a green pear", "a white plate"],
    ["A man", "an umbrella", "a yellow taxi", "the rain"],
    ["a dog", "a field", "flowers"],
    ["The İstanbul skyline", "a tall tower", "night"],
    [],
    [],
]
EXPECTED_REFERRING = [
    ["a black dog on the left of the wooden bench", "a cat"],  # the conjunction ends the expression
    ["Two Red Apples", "a green pear on a white plate"],
    ["A man holding an umbrella", "a yellow taxi in the rain"],
    ["a dog in a field of flowers"],  # the Kosmos-2 GRIT example; contained chunks are dropped
    ["The İstanbul skyline with a tall tower at night"],
    [],
    [],
]


@pytest.fixture(scope="module")
def stages():
    paper = PhraseStage(PhrasesConfig(mode="paper"))
    chunks = PhraseStage(PhrasesConfig(mode="noun_chunks"))
    chunks.setup()  # one parser-enabled pipeline, shared by both noun-chunk stages
    return {
        "paper": paper,
        "chunks": chunks,
        "referring": PhraseStage(PhrasesConfig(mode="noun_chunks", expand_referring=True), nlp=chunks._nlp),
    }


def _check_spans(captions, results):
    for cap, phrases in zip(captions, results, strict=True):
        for p in phrases:
            assert cap[p.char_start : p.char_end] == p.text
        starts = [p.char_start for p in phrases]
        assert starts == sorted(starts)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("paper", EXPECTED_PAPER), ("chunks", EXPECTED_CHUNKS), ("referring", EXPECTED_REFERRING)],
)
def test_expected_phrases_and_exact_spans(stages, mode, expected):
    results = stages[mode].extract(CAPTIONS)
    assert [[p.text for p in ps] for ps in results] == expected
    _check_spans(CAPTIONS, results)


def test_paper_mode_keeps_original_case_after_lowercasing(stages):
    # the tagger sees lowercase text, the phrase is still the caption's own slice (length-preserving lower)
    (ps,) = stages["paper"].extract([FRUIT])
    assert ps[0].text == "Red Apples"
    assert FRUIT[ps[0].char_start : ps[0].char_end] == "Red Apples"
    assert lower_preserving_length("İstanbul") != "İstanbul".lower()
    assert len(lower_preserving_length("İstanbul")) == len("İstanbul")


def test_duplicates_removed_first_occurrence_kept(stages):
    cap = "A red ball, a blue box and A RED BALL next to a red ball."
    (ps,) = stages["paper"].extract([cap])
    assert [p.text for p in ps] == ["A red ball", "a blue box"]
    assert ps[0].char_start == 0


def test_max_phrases_cap(stages):
    cap = ", ".join(f"a {w}" for w in "cat dog cow pig hen fox owl bee ant elk yak emu".split()) + "."
    (ps,) = stages["paper"].extract([cap])
    assert len(ps) == 12
    stages["paper"].setup()
    capped = PhraseStage(PhrasesConfig(mode="paper", max_phrases=4), nlp=stages["paper"]._nlp)
    (ps,) = capped.extract([cap])
    assert [p.text for p in ps] == ["a cat", "a dog", "a cow", "a pig"]


def test_generic_only_chunks_dropped_content_words_kept(stages):
    cap = "Stock photo of a png image: a snowy background, the background and a close-up of a photo frame."
    (ps,) = stages["paper"].extract([cap])
    assert [p.text for p in ps] == ["a snowy background", "a photo frame"]


@pytest.mark.parametrize(
    "alt_text",
    ["Free download png", "IMG_2231 stock vector", "dd5bfbc2.jpg", "wallpaper hd", "DSC11487", "shutterstock_123456789"],
)
def test_web_noise_alt_texts_give_no_phrases(stages, alt_text):
    """Uninformative web alt-texts (file names, ids, download boilerplate) must not become queries."""
    (ps,) = stages["paper"].extract([alt_text])
    assert ps == [], [p.text for p in ps]


def test_informative_alt_text_keeps_its_object(stages):
    (ps,) = stages["paper"].extract(["red star on white, free vector illustration"])
    assert [p.text for p in ps] == ["red star"]


def test_hyphenated_compounds_stay_one_word(stages):
    cap = "A man in a T-shirt walks a black-and-white dog past a well-lit shop"
    (ps,) = stages["paper"].extract([cap])
    assert [p.text for p in ps] == ["A man", "a T-shirt", "a black-and-white dog", "a well-lit shop"]
    _check_spans([cap], [ps])


def test_chunk_grammar_is_a_regexp_chunker_over_tags():
    pat = tag_pattern_to_regex(PAPER_GRAMMAR)
    tags = ["DT", "JJ", "JJR", "NN", "NNS", "IN", "DT", "NNP", "VBZ", "JJ", "PDT", "NN", "DT"]
    assert chunk_tags(tags, pat) == [(0, 5), (6, 8), (11, 12)]  # adjective-only and lone DT are no chunks
    assert chunk_tags(["PDT", "NN"], pat) == [(1, 2)]  # <DT> does not match inside PDT
    assert chunk_tags([], pat) == []
    with pytest.raises(UserError):
        tag_pattern_to_regex("DT JJ NN")


def test_stage_sets_phrases_and_fails_samples_without_caption(stages):
    batch = [
        Sample(key="a", source_shard="s", caption=TAXI),
        Sample(key="b", source_shard="s", caption=None),
        Sample(key="c", source_shard="s", caption=""),
    ]
    stage = stages["paper"]
    assert stage.name == "phrases"
    stage(batch)
    assert [p.text for p in batch[0].phrases] == EXPECTED_PAPER[2]
    assert batch[1].error is not None
    assert batch[1].error.stage == "phrases"
    assert batch[2].ok
    assert batch[2].phrases == []
    prov = stage.provenance()
    assert prov["phrases.mode"] == "paper"
    assert prov["phrases.spacy_model"].startswith("en_core_web_sm")
    assert "NP:" in prov["phrases.grammar"]


def test_unknown_spacy_model_is_a_user_error():
    stage = PhraseStage(PhrasesConfig(spacy_model="no_such_spacy_model_xyz"))
    with pytest.raises(UserError, match="spacy_model"):
        stage.setup()


def test_noun_chunks_drop_abstract_heads_like_grit(stages):
    cap = "The love of a mother for her child at the best time of the year, a symbol of freedom."
    (ps,) = stages["chunks"].extract([cap])
    assert [p.text for p in ps] == ["a mother", "her child", "a symbol"]
