"""The fast paths of the quality checks decide exactly as straightforward reference versions do.

Each reference below is the plain algorithm (every pattern on every turn, every phrase length at every
word, one caption at a time, one blake2b per shingle); the checks' shortcuts must give the same answers
on many generated texts built from the phrases the checks look for, including the case-folding traps.
"""
from __future__ import annotations

import hashlib
import random
import re
import string
import sys

import numpy as np
import pytest

from datagen.coco import ImageRecord, ObjectBox
from datagen.quality import QualityChecker, SampleView, checks
from datagen.quality import minhash
from datagen.quality.minhash import _PRIME, MinHasher, NearDuplicateIndex, shingles
from datagen.quality.objects import ObjectMatcher, default_matcher, ground_truth, tokenize

FRAGMENTS = (
    "the caption says", "The Caption", "captioned", "bounding box", "BOUNDING-BOX", "box coordinates", "coordinates",
    "[0.1, 0.2]", "[ 1 , 2 ]", "[3]", "0.234", "1.2345", "10.123", ".123", "٣.١٢٣", "the given text", "These provided details",
    "the above information", "according to the data", "mentioned in the context", "listed by the annotations",
    "the description says", "annotations", "annotator", "I'm sorry", "I am afraid", "I apologise", "I apologize",
    "I can't see", "I can’t help", "I cannot view", "I don’t answer", "I do not describe", "I'm unable to describe",
    "I’m not able to tell", "unable to see the image", "no picture was provided", "without an image given",
    "without seeing the photo", "without access to the picture", "As an AI", "as a language model", "as an assistant",
    "I'm a chatbot", "I am an AI", "I am a virtual assistant", "language model", "I don't have eyes",
    "I do not have the ability", "Sure!", "Of course,", "ok.", "Okay!", "certainly.", "here is a description",
    "Here are some questions", "here is the q&a", "There is a response", "I hope this helps", "let me know if",
    "feel free to ask", "(Note:", "note :", "Note that", "a dog", "two dogs", "no dog", "not a cat", "isn't a horse",
    "might be a laptop", "an orange on the table", "orange and white", "bright orange", "the hot dog", "bus stop",
    "a tie", "the remote", "a teddy bear", "cell phone", "traffic light", "people", "a person", "cars", "trucks",
    "İ", "ı", "ſ", "\u212a", "ſorry", "I’m ſorry", "İ am sorry", "captİon", "CAPTİON", "\u212aept", "the", "and", "with",
    "or", "white", "is", ",", ".", "!", "?", "-", ";", "(", ")", "\n", "  ", "é", "’", "1. item", "- item", "of the",
)


def _texts(seed: int, count: int, max_words: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, max_words))) for _ in range(count)]


def _views(seed: int, count: int) -> list[SampleView]:
    rng = random.Random(seed)
    texts = _texts(seed, 4 * count)
    views = []
    for n in range(count):
        turns = []
        for t in range(rng.choice([2, 2, 4, 6])):
            value = texts[4 * n + t % 4]
            turns.append(("human" if t % 2 == 0 else "gpt", ("<image>\n" if t == 0 else "") + value))
        views.append(SampleView(key=f"s{n}", turns=turns, split=rng.choice(["conversation", "detail", None])))
    return views


# --- phrase checks: every pattern, every turn ---------------------------------------------------------------


def _ref_source_leak(view: SampleView) -> str | None:
    for speaker, value in view.turns:
        for pattern in checks._LEAK_ANY_TURN + (checks._LEAK_ANSWER if speaker == "gpt" else []):
            found = pattern.search(value)
            if found:
                return f"{speaker} turn mentions {found.group(0)!r}"
    return None


def _ref_answer_pattern(view: SampleView, pattern: re.Pattern[str], strip: bool) -> str | None:
    for answer in view.answers:
        found = pattern.search(answer)
        if found:
            return f"answer says {(found.group(0).strip() if strip else found.group(0))!r}"
    return None


def test_phrase_checks_match_the_unfiltered_patterns():
    views = _views(11, 3000)
    env = QualityChecker().env
    for view in views:
        assert checks.check_source_leak(view, env) == _ref_source_leak(view)
        assert checks.check_refusal(view, env) == _ref_answer_pattern(view, checks._REFUSAL, strip=False)
        assert checks.check_ai_self_talk(view, env) == _ref_answer_pattern(view, checks._SELF_TALK, strip=True)


def test_every_pattern_match_has_one_of_its_needed_words():
    filtered = [
        *zip(checks._LEAK_ANY_TURN, checks._LEAK_ANY_TURN_FILTERS),
        *zip(checks._LEAK_ANSWER, checks._LEAK_ANSWER_FILTERS),
        (checks._REFUSAL, checks._REFUSAL_FILTER),
        (checks._SELF_TALK, checks._SELF_TALK_FILTER),
    ]
    hits = 0
    for text in _texts(12, 4000, max_words=8):
        for pattern, needs in filtered:
            found = pattern.search(text)
            if found:
                hits += 1
                # the matched phrase alone must pass the prefilter, not just the text around it
                assert checks._may_match(needs, found.group(0), checks._lowered(found.group(0))), (pattern.pattern, found)
    assert hits > 1000


def test_case_fold_traps_are_all_the_non_ascii_letters_ignorecase_maps_to_ascii():
    letter = re.compile("[a-z]", re.I)
    folded = [chr(cp) for cp in range(0x80, sys.maxunicode + 1) if letter.fullmatch(chr(cp))]
    assert folded, "re.I maps some non-ASCII letters to ASCII ones"
    for ch in folded:
        # fine if lower() gives the very letter re.I matched it to; otherwise the prefilters must stand aside
        matched = [c for c in string.ascii_lowercase if re.fullmatch(c, ch, re.I)]
        if ch.lower() not in matched:
            assert checks._CASE_FOLD_TRAPS.search(ch), hex(ord(ch))


# --- objects: every phrase length at every word, one caption at a time --------------------------------------


def _ref_mentions(matcher: ObjectMatcher, text: str) -> list[tuple[str, str, bool, bool]]:
    tokens = tokenize(text)
    found, i = [], 0
    while i < len(tokens):
        for length in range(min(matcher.max_len, len(tokens) - i), 0, -1):
            key = tuple(tokens[i : i + length])
            if key in matcher.phrases:
                category = matcher.phrases[key]
                if category is not None and (key not in matcher.ambiguous or matcher._is_noun_use(tokens, i, i + length)):
                    found.append((category, " ".join(key), matcher._negated(tokens, i), matcher._hedged(tokens, i)))
                i += length
                break
        else:
            i += 1
    return found


def test_object_mentions_and_categories_match_the_plain_scan():
    matcher = default_matcher()
    for text in _texts(13, 3000):
        expected = _ref_mentions(matcher, text)
        assert [(m.category, m.phrase, m.negated, m.hedged) for m in matcher.mentions(text)] == expected
        for hedged in (True, False):
            assert matcher.categories(text, include_hedged=hedged) == {
                c for c, _, negated, is_hedged in expected if not negated and (hedged or not is_hedged)}


@pytest.mark.parametrize("dotted_phrase", [False, True])
def test_joined_scan_is_the_scan_of_the_joined_text(dotted_phrase):
    """scan_joined (the texts' own scans, shifted, where every text but the last ends on a clause end no phrase holds)
    gives exactly the tokens and phrases of scanning the joined text, for any texts and separator."""
    names = {"dog": ["puppy"], "cat": [], "hot dog": [], "orange": [], "person": ["man", "st. bernard", "mr, x"]}
    rng = random.Random(20)
    texts = _texts(20, 3000, max_words=10) + ["hot", "dog", "orange", "and white", "st", ". bernard", "is", "mr", ", x"]
    assembled = 0
    for n in range(3000):
        if n % 500 == 0:  # fresh caches now and then; the phrases of the first matcher hold no punctuation
            matcher = ObjectMatcher(names, ["orange"], ["bus stop"]) if dotted_phrase else default_matcher()
            matcher._scans.clear()
        parts = [rng.choice(texts) + rng.choice(["", "", ".", ",", "!", " ;", "\n", " and", "-"])
                 for _ in range(rng.randint(0, 5))]
        sep = rng.choice(["\n", "\n", " ", "\n\n", " . ", "'", ""])
        for _ in range(rng.randint(0, 2)):  # some parts already scanned, as other checks leave them
            if parts:
                matcher.scan(rng.choice(parts))
        joined = sep.join(parts)
        tokens = tokenize(joined)
        assert matcher.scan_joined(parts, sep) == (tokens, matcher._found(tokens)), (parts, sep)
        assert matcher.scan(joined) == (tokens, matcher._found(tokens))
        ends = [tokenize(p)[-1:] for p in parts[:-1]]
        assembled += sep.isspace() and all(not e or e[0] in matcher._breaks for e in ends) and len(parts) > 1
    assert assembled > 100


@pytest.mark.parametrize("dotted_phrase", [False, True])
def test_ground_truth_matches_caption_by_caption(dotted_phrase):
    names = {"dog": ["puppy"], "cat": [], "hot dog": [], "orange": [], "person": ["man", "st. bernard"]}
    matcher = ObjectMatcher(names, ["orange"], ["bus stop"]) if dotted_phrase else default_matcher()
    rng = random.Random(14)
    texts = _texts(14, 3000, max_words=10) + ["st", "bernard", "st.", "bernard dog"]
    for n in range(1500):
        captions = [rng.choice(texts) for _ in range(rng.randint(0, 6))]
        record = ImageRecord(id=n, file_name="x.jpg", width=1, height=1, captions=captions,
                             objects=[ObjectBox(category="cat", bbox=(0, 0, 1, 1))] if n % 3 == 0 else [])
        expected = {o.category for o in record.objects}
        for caption in captions:
            expected |= {c for c, _, negated, _ in _ref_mentions(matcher, caption) if not negated}
        assert ground_truth(record, matcher) == expected


# --- near-duplicates: one blake2b per shingle, every item against every hash function --------------------------


def _ref_signature(hasher: MinHasher, items: set[str]) -> np.ndarray:
    if not items:
        return np.full(hasher.num_perm, _PRIME, dtype=np.uint64)
    hashes = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little") for s in items],
                      dtype=np.uint64)
    return ((np.outer(hashes, hasher.a) + hasher.b) % _PRIME).min(axis=0)


def _ref_shingles(text: str, size: int) -> set[str]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    if len(words) <= size:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def test_shingles_and_signatures_match_the_plain_computation():
    hasher = MinHasher(128)
    for text in _texts(15, 1500, max_words=60):
        for size in (1, 2, 3):
            assert shingles(text, size) == _ref_shingles(text, size)
        items = shingles(text, 2)
        assert np.array_equal(hasher.signature(items), _ref_signature(hasher, items))
        assert np.array_equal(hasher.signature(items), _ref_signature(hasher, items))  # second time from the cache


def test_near_duplicate_band_keys_agree_when_the_band_slices_do():
    index = NearDuplicateIndex(0.8, 2, 128)
    sigs = [index.signature(text) for text in _texts(16, 200, max_words=40)]
    rng = random.Random(16)
    for n in range(0, len(sigs) - 1, 2):  # pairs that share some bands by construction
        shared = rng.sample(range(32), rng.randint(0, 32))
        for b in shared:
            sigs[n + 1][b * 4:(b + 1) * 4] = sigs[n][b * 4:(b + 1) * 4]
    keys = [index.band_keys(sig) for sig in sigs]
    for a in range(0, len(sigs), 7):
        for c in range(len(sigs)):
            for b in range(32):
                same_slice = np.array_equal(sigs[a][b * 4:(b + 1) * 4], sigs[c][b * 4:(b + 1) * 4])
                assert (keys[a][b] == keys[c][b]) == same_slice
            assert set(keys[a]).isdisjoint(keys[c][b] for b in range(32) if keys[c][b] not in keys[a][b:b + 1])
    assert index.band_keys(sigs[0].astype(np.uint64)) == keys[0]


@pytest.mark.parametrize("hot_bucket", [64, 2], ids=["hot-buckets-as-shipped", "every-bucket-hot"])
@pytest.mark.parametrize("threshold", [0.5, 0.75, 0.8, 0.9, 1.0])
def test_near_duplicate_match_is_the_plain_best_of_all_remembered(threshold, hot_bucket, monkeypatch):
    """match/insert (LSH candidates, optional precomputed bands, candidates sharing too few bands to reach the
    threshold skipped, the largest buckets read by bisection) give the plain scan's answer: the most similar
    remembered signature sharing a band, first on ties, if at or above the threshold."""
    monkeypatch.setattr(minhash, "HOT_BUCKET", hot_bucket)
    index = NearDuplicateIndex(threshold, 2, 128)
    rng = random.Random(19)
    texts = _texts(19, 300, max_words=12)
    # near-copies at every distance: a text with a few of its words changed, dropped or added
    for base in _texts(23, 150, max_words=40):
        words = base.split()
        for _ in range(rng.randint(0, 4)):
            if words:
                words[rng.randrange(len(words))] = rng.choice(["cat", "dog", "", "a b", "the"])
        texts += [base, " ".join(words)]
    rng.shuffle(texts)
    assert index.min_shared_bands == max(0, 32 - (128 - next(a for a in range(129) if a / 128 >= threshold)))
    remembered: list[np.ndarray] = []
    matched = 0
    for n, text in enumerate(texts):
        sig = index.signature(text)
        bands = index.band_keys(sig) if n % 2 else None
        expected = None
        # the plain scan, in one numpy step per text: which remembered signatures agree on every row of some band
        kept = np.array(remembered, dtype=np.uint32).reshape(len(remembered), 128)
        same_band = (kept.reshape(len(remembered), 32, 4) == sig.reshape(32, 4)).all(axis=2).any(axis=1)
        sharing = [int(i) for i in np.flatnonzero(same_band)]
        if sharing:
            sims = [float(np.mean(remembered[i] == sig)) for i in sharing]
            best = max(range(len(sharing)), key=lambda k: (sims[k], -k))
            if sims[best] >= threshold:
                expected = (f"t{sharing[best]}", sims[best])
        assert index.match(sig, bands) == expected
        matched += expected is not None and expected[1] < 1.0
        index.insert(f"t{len(remembered)}", sig, bands)
        remembered.append(sig)
    assert matched > 5 or threshold == 1.0


# --- small helpers: sentence ends read from the end, views straight from a Sample ------------------------------


def test_sentence_end_test_matches_the_pattern():
    rng = random.Random(17)
    pieces = ("word", " ", ".", "!", "?", "…", '"', "'", "”", "’", ")", "]", "*", "_", "\n", ",", "-", "a.b", "(", "[")
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 8))) for _ in range(20000)]
    for text in texts:
        assert checks._ends_sentence(text) == bool(checks._SENTENCE_END.search(text)), repr(text)


@pytest.mark.parametrize("meta", [None, {}, {"finish_reason": "stop"}, {"finish_reason": None, "model": "m"}])
@pytest.mark.parametrize("split", [None, "detail"])
def test_view_from_sample_is_the_view_from_its_record(meta, split):
    from datagen.sample import Sample

    sample = Sample(id="000000000802-conversation", image="000000000802.jpg", split="conversation", meta=meta,
                    conversations=[{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}])
    for finish_reason in (None, "length"):
        assert SampleView.from_sample(sample, split=split, finish_reason=finish_reason) == SampleView.from_record(
            sample.to_record(), split=split, finish_reason=finish_reason)


def test_signature_residues_at_the_edges_of_the_prime():
    hasher = MinHasher(128)
    # hashes whose a*h + b lands on or next to multiples of the prime for some hash function
    edge = {int(h) for a, b in zip(hasher.a[:16], hasher.b[:16]) for k in (1, 2, 3, 1000)
            for h in [((k * _PRIME - int(b)) * pow(int(a), -1, _PRIME) + d) % _PRIME for d in (-1, 0, 1)]}
    edge |= {0, 1, _PRIME - 1, _PRIME, _PRIME + 1, 2**32 - 1}
    words = {f"w{h}" for h in edge}
    hasher._hashes.update({f"w{h}": h for h in edge})
    expected_hashes = np.array([hasher._hashes[w] for w in words], dtype=np.uint64)
    expected = ((np.outer(expected_hashes, hasher.a) + hasher.b) % _PRIME).min(axis=0)
    assert np.array_equal(hasher.signature(words), expected)
    for w in words:
        single = ((np.uint64(hasher._hashes[w]) * hasher.a + hasher.b) % _PRIME)
        assert np.array_equal(hasher.signature({w}), single)


def test_hash_cache_overflow_keeps_signatures(monkeypatch):
    import datagen.quality.minhash as minhash

    monkeypatch.setattr(minhash, "_HASH_CACHE_SIZE", 50)
    hasher = MinHasher(64)
    for text in _texts(18, 300, max_words=40):
        items = shingles(text, 2)
        assert np.array_equal(hasher.signature(items), _ref_signature(hasher, items))
    assert len(hasher._hashes) <= max(50, max(len(shingles(t, 2)) for t in _texts(18, 300, max_words=40)))


@pytest.mark.parametrize("rows_kept", [1, 7, 60, 1 << 14])
def test_row_cache_keeps_signatures(monkeypatch, rows_kept):
    """Signatures from the kept rows of each shingle's values are the plain ones, whatever the cache holds, drops or
    cannot hold (texts with more shingles than it keeps)."""
    import datagen.quality.minhash as minhash

    monkeypatch.setattr(minhash, "_ROW_CACHE_SIZE", rows_kept)
    hasher = MinHasher(64)
    texts = _texts(21, 400, max_words=40)
    for text in texts + texts[::3]:
        items = shingles(text, 2)
        assert np.array_equal(hasher.signature(items), _ref_signature(hasher, items))
        assert hasher.signature(items).dtype == np.uint32
    assert len(hasher._row_of) <= max(rows_kept, max(len(shingles(t, 2)) for t in texts))


@pytest.mark.parametrize("rows_kept", [1, 7, 60, 1 << 14])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_text_signatures_by_word_pairs_are_the_plain_ones(monkeypatch, rows_kept, size):
    """NearDuplicateIndex.signature (2-word shingles looked up by their words, rows kept or dropped, mixed with
    signatures of shingle sets on the same hasher) is the plain signature of the text's shingles."""
    import datagen.quality.minhash as minhash

    monkeypatch.setattr(minhash, "_ROW_CACHE_SIZE", rows_kept)
    index = NearDuplicateIndex(0.8, size, 64)
    rng = random.Random(25)
    texts = _texts(25, 300, max_words=40) + ["", "a", "a b", "a b c", "a a a a", "b a b a b", "x1 y2 x1 y2"]
    for text in texts + rng.sample(texts, 100):
        items = shingles(text, size)
        assert np.array_equal(index.signature(text), _ref_signature(index.hasher, items)), text
        if rng.random() < 0.3:
            other = shingles(rng.choice(texts), size)
            assert np.array_equal(index.hasher.signature(other), _ref_signature(index.hasher, other))


def test_parse_clean_matches_every_pattern_applied():
    """parse._clean skips a pattern only where the text cannot hold a match: the result is that of all three."""
    from datagen import parse

    def reference(text: str) -> str:
        text = parse._SEPARATOR_LINE.sub("", text)
        text = parse._TRAILING_BOLD.sub("", text.strip()).strip()
        return parse._BLANK_LINES.sub("\n\n", text)

    rng = random.Random(22)
    pieces = ("word", " ", "\t", "\n", "\n\n", "=", "==", "===", "-", "--", "---", "*", "**", "***", "_", "__", "___",
              "\u3000", "\r", "Answer:", ".")
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 14))) for _ in range(30000)]
    for text in texts:
        assert parse._clean(text) == reference(text), repr(text)


def _ref_position_claims(text: str, matcher: ObjectMatcher) -> list:
    """position_claims as first written: every word visited, the sentence re-read for each object before."""
    from datagen.quality import counting as c

    tokens, found = tokenize(text), matcher._found(tokenize(text))
    claims = []
    i = 0
    while i < len(tokens):
        if tokens[i] not in c._RELATION_FIRST_WORDS:
            i += 1
            continue
        relation = None
        for length in range(c._MAX_RELATION, 0, -1):
            key = tuple(tokens[i:i + length])
            if key in c.RELATIONS:
                relation = c.RELATIONS[key]
                break
        if relation is None:
            i += 1
            continue
        before = [(s, k, cat) for s, k, cat in found if s + len(k) <= i
                  and not any(t in c._SENTENCE_STOPS for t in tokens[s + len(k):i])]
        after = [(s, k, cat) for s, k, cat in found if s >= i + length and s - (i + length) <= c.OBJECT_WINDOW
                 and not any(t in c._CLAUSE_END for t in tokens[i + length:s])]
        if before and after and len({cat for _, _, cat in before}) == 1:
            first, second = before[-1], after[0]
            if first[2] != second[2]:
                claims.append(c.PositionClaim(first[2], relation, second[2],
                                              " ".join(tokens[first[0]:second[0] + len(second[1])])))
        i += length
    return claims


def test_position_claims_match_the_word_by_word_reading():
    from datagen.quality.counting import position_claims

    matcher = default_matcher()
    rng = random.Random(24)
    pieces = ("to the left of", "on the right side of", "left of", "right", "to", "on", "on top of", "atop", "above",
              "under", "underneath", "beneath", "below", "at the left of", "to the right side of", "the", "a dog",
              "the cat", "a man", "two people", "the table", "a hot dog", "the orange", "laptop", "and", "is", "sits",
              ".", ",", "!", "?", ";", ":", "(", "very", "next", "of", "at")
    texts = [" ".join(rng.choice(pieces) for _ in range(rng.randint(0, 25))) for _ in range(6000)]
    claims = 0
    for text in texts:
        expected = _ref_position_claims(text, matcher)
        assert position_claims(text, matcher) == expected, text
        claims += len(expected)
    assert claims > 1000


# --- word and token cutting: the ASCII fast paths against the regexes they replace -----------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from datagen.quality.words import tokens, words  # noqa: E402

# Letters, digits, every clause mark, the ASCII whitespace and other punctuation, control characters and a few
# non-ASCII letters and digits (the regex path), drawn densely so that letter-digit and mark-letter contacts occur.
_CUT_ALPHABET = list("abcxyz0159.,;:!?()\"'-_/*[]{}<>@#$%&=+~`|\\ \t\n\r\x0b\x0c\x00\x7f") + ["é", "ß", "٣", "Ⅻ", "\u00a0"]


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=st.sampled_from(_CUT_ALPHABET), max_size=60))
def test_words_and_tokens_are_the_regex_matches(text):
    text = text.lower()
    assert words(text) == re.findall(r"[a-z0-9]+", text)
    assert tokens(text) == re.findall(r"[a-z]+|[0-9]+|[.,;:!?()\"]", text)


def test_words_and_tokens_on_the_fragments_joined():
    rng = random.Random(29)
    for _ in range(3000):
        text = " ".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 12))).lower()
        assert words(text) == re.findall(r"[a-z0-9]+", text)
        assert tokens(text) == re.findall(r"[a-z]+|[0-9]+|[.,;:!?()\"]", text)


# --- object findings: captions scanned only for objects named but not boxed ----------------------------------------

_FINDING_WORDS = ["a dog", "two dogs", "no cat", "the hot dog", "a person", "people", "an orange on the table",
                  "orange and white", "a tie", "bus stop", "cell phone", "might be a laptop", "the", "and", ".", ","]
_CATEGORIES = ["dog", "cat", "person", "orange", "tie", "cell phone", "laptop", "hot dog", "car"]


@settings(max_examples=400, deadline=None)
@given(answers=st.lists(st.lists(st.sampled_from(_FINDING_WORDS), max_size=12).map(" ".join), min_size=1, max_size=4),
       captions=st.lists(st.lists(st.sampled_from(_FINDING_WORDS), max_size=10).map(" ".join), max_size=5),
       boxed=st.lists(st.sampled_from(_CATEGORIES), max_size=5), cache_size=st.sampled_from([1, 4096]))
def test_object_findings_are_the_mentions_less_the_whole_ground_truth(answers, captions, boxed, cache_size):
    record = ImageRecord(id=len(answers), file_name="x.jpg", width=1, height=1, captions=captions,
                         objects=[ObjectBox(category=c, bbox=(0, 0, 1, 1)) for c in boxed])
    turns = [t for n, a in enumerate(answers) for t in (("human", ("<image>\n" if n == 0 else "") + "What is it?"),
                                                        ("gpt", a))]
    view = SampleView(key="s", turns=turns, split="conversation", record=record)
    checker = QualityChecker()
    checker.env.TRUTH_CACHE_SIZE = cache_size
    checker.env.truths[-1] = {"dog"}  # another image's truth: with a cache of 1 it is dropped, not used
    hedged = checker.config.count_hedged_mentions
    for _ in range(2):  # the second time from the remembered truth (or a cache started over)
        checker.env.memo.clear()  # as before each sample: the findings themselves are remembered per sample
        mentioned, hallucinated = checks.object_findings(view, checker.env)
        assert mentioned == checker.env.matcher.categories("\n".join(answers), include_hedged=hedged)
        assert hallucinated == mentioned - ground_truth(record, checker.env.matcher)


@settings(max_examples=300, deadline=None)
@given(named=st.sets(st.sampled_from(_CATEGORIES)),
       captions=st.lists(st.lists(st.sampled_from(_FINDING_WORDS), max_size=10).map(" ".join), max_size=5),
       boxed=st.lists(st.sampled_from(_CATEGORIES), max_size=5))
def test_not_in_image_is_the_categories_less_the_ground_truth(named, captions, boxed):
    """What `datagen stats` counts as hallucinated (CHAIR) without a checking run's remembered truths."""
    from datagen.quality.objects import default_matcher, not_in_image

    record = ImageRecord(id=1, file_name="x.jpg", width=1, height=1, captions=captions,
                         objects=[ObjectBox(category=c, bbox=(0, 0, 1, 1)) for c in boxed])
    matcher = default_matcher()
    assert not_in_image(record, set(named), matcher) == set(named) - ground_truth(record, matcher)


# --- counts: the captions read only for a claim the boxes alone refuse ---------------------------------------------

_COUNT_WORDS = ["two dogs", "three cats", "a dog", "one cat", "several dogs", "twelve people", "4 people", "a pair of dogs",
                "there are two dogs", "both cats", "the", "and", ".", ",", "a person", "no dogs"]


def _ref_wrong_count(view: SampleView, env) -> str | None:
    from datagen.quality.counting import box_counts, count_claims, count_problem
    record = view.record
    if record is None or not record.objects:
        return None
    counts, crowd = box_counts(record)
    stated = {(c.category, c.count) for cap in record.captions for c in count_claims(cap, env.matcher)
              if c.count is not None}
    for i, answer in enumerate(view.answers):
        for claim in count_claims(answer, env.matcher):
            boxes = counts.get(claim.category, 0)
            if boxes == 0 and claim.category not in crowd:
                continue
            if claim.count is not None and (claim.category, claim.count) in stated:
                continue
            problem = count_problem(claim, boxes, claim.category in crowd)
            if problem:
                return f"answer {i + 1}: {problem}"
    return None


@settings(max_examples=500, deadline=None)
@given(answers=st.lists(st.lists(st.sampled_from(_COUNT_WORDS), max_size=10).map(" ".join), min_size=1, max_size=3),
       captions=st.lists(st.lists(st.sampled_from(_COUNT_WORDS), max_size=8).map(" ".join), max_size=4),
       boxed=st.lists(st.tuples(st.sampled_from(["dog", "cat", "person"]), st.booleans()), max_size=6))
def test_wrong_count_is_the_reading_with_every_caption_count(answers, captions, boxed):
    from datagen.quality.counting import check_wrong_count
    record = ImageRecord(id=1, file_name="x.jpg", width=1, height=1, captions=captions,
                         objects=[ObjectBox(category=c, bbox=(0, 0, 1, 1), iscrowd=crowd) for c, crowd in boxed])
    turns = [t for n, a in enumerate(answers) for t in (("human", ("<image>\n" if n == 0 else "") + "How many?"),
                                                        ("gpt", a))]
    view = SampleView(key="s", turns=turns, split="conversation", record=record)
    env = QualityChecker().env
    assert check_wrong_count(view, env) == _ref_wrong_count(view, env)


# --- a parsed sample's record, built without the model ---------------------------------------------------------

_JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
_PLAIN_JSON = st.recursive(_JSON_LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=12)
# What the model converts or refuses, and the fast path must leave to it.
_NOT_PLAIN = st.one_of(st.tuples(st.integers()), st.frozensets(st.integers(), max_size=2),
                       st.dictionaries(st.integers(), st.integers(), min_size=1, max_size=2), st.just(b"bytes"),
                       st.builds(ObjectBox, category=st.just("dog"), bbox=st.just((0, 0, 1, 1))))
_TURN_VALUES = st.lists(st.sampled_from(["<image>", "<image>\n", "What is it?", "A dog.", " ", "", "\n", "é"]),
                        max_size=3).map("".join)


# Mostly well-formed conversations (what parsing gives), some with any turns at all.
_WELL_FORMED = st.lists(st.tuples(_TURN_VALUES.filter(lambda v: "<image>" not in v and v.strip()),
                                  _TURN_VALUES.filter(str.strip)), min_size=1, max_size=3).map(
    lambda pairs: [t for n, (q, a) in enumerate(pairs) for t in (("human", ("<image>\n" if n == 0 else "") + q), ("gpt", a))])
_ANY_TURNS = st.lists(st.tuples(st.sampled_from(["human", "gpt", "system", "Human", 3]), _TURN_VALUES | st.integers()),
                      max_size=6)


@settings(max_examples=1500, deadline=None)
@given(turns=st.one_of(_WELL_FORMED, _WELL_FORMED, _ANY_TURNS),
       sample_id=st.sampled_from(["000000000007", "", 7, None]), image=st.sampled_from(["7.jpg", "", 7, None]),
       split=st.sampled_from(["conversation", "detail", "", None, 3]),
       meta=st.one_of(st.none(), st.dictionaries(st.text(max_size=5), _PLAIN_JSON | _NOT_PLAIN, max_size=4),
                      st.lists(st.integers(), max_size=2)))
def test_plain_record_is_the_models_record(turns, sample_id, image, split, meta):
    """Where `plain_record` builds the record itself, it is the model's record, and it builds one only where the
    model accepts the fields as they are; otherwise (None) the model decides."""
    from pydantic import ValidationError

    from datagen.jsonl import json_line
    from datagen.sample import Sample, plain_record

    fast = plain_record(sample_id, image, turns, split, meta)
    try:
        model = Sample(id=sample_id, image=image, conversations=[{"from": s, "value": v} for s, v in turns],
                       split=split, meta=meta).to_record()
    except ValidationError:
        assert fast is None
        return
    if fast is not None:
        assert fast == model and json_line(fast) == json_line(model)
        assert fast["conversations"] is not model["conversations"]
        if isinstance(meta, dict):
            assert fast["meta"] is not meta  # a copy, as the model's


_COMPLETION_PIECES = ["Question: ", "Answer: ", "Q: ", "A: ", "**Question 2:** ", "What is on the table?", "A cat.",
                      "<image>", "\n", "\n\n", "===", "---", " ", "Detailed description: ", "It is sunny."]


@settings(max_examples=1500, deadline=None)
@given(text=st.lists(st.sampled_from(_COMPLETION_PIECES), max_size=14).map("".join),
       split=st.sampled_from(["conversation", "reasoning", "detail", "negative", "grounded"]),
       truncated=st.booleans(), meta=st.sampled_from([{}, {"finish_reason": "stop", "usage": {"prompt_tokens": 3}},
                                                      {"absent_objects": ["dog"], "n": (1, 2)}]))
def test_build_record_is_the_models_record(text, split, truncated, meta):
    """The judges' record of a completion is the one the Sample model gives for the parsed turns, and a completion
    one refuses the other refuses with the same code and detail; `build_sample` is that record as the model."""
    from pydantic import ValidationError

    from datagen.parse import ParseError, build_record, build_sample, parse_turns
    from datagen.sample import Sample

    fields = dict(split=split, text=text, sample_id="000000000007", image="000000000007.jpg",
                  instruction="Describe the image." if split == "detail" else None, meta=meta, truncated=truncated)
    try:
        turns = parse_turns(split=split, text=text, instruction=fields["instruction"], truncated=truncated)
        expected = Sample(id=fields["sample_id"], image=fields["image"], split=split, meta=meta,
                          conversations=[{"from": s, "value": v} for s, v in turns]).to_record()
    except ParseError as exc:
        refusal = (exc.code, exc.detail)
    except ValidationError as exc:
        refusal = ("invalid_sample", exc.errors()[0]["msg"])
    else:
        assert build_record(**fields) == expected
        assert build_sample(**fields).to_record() == expected
        return
    with pytest.raises(ParseError) as caught:
        build_record(**fields)
    assert (caught.value.code, caught.value.detail) == refusal

@settings(max_examples=1500, deadline=None)
@given(buckets=st.lists(st.sets(st.integers(0, 60), min_size=1, max_size=40).map(sorted), max_size=32),
       need=st.integers(1, 12), hot=st.sampled_from([1, 3, 8, 64]))
def test_indices_in_enough_buckets_are_the_plain_count(buckets, need, hot):
    """`sharing` (the largest buckets left out of the count and read by bisection) finds exactly the indices that
    counting every bucket finds."""
    from collections import Counter
    from itertools import chain

    expected = sorted(i for i, shared in Counter(chain.from_iterable(buckets)).items() if shared >= need)
    assert sorted(minhash.sharing(buckets, need, hot)) == expected
