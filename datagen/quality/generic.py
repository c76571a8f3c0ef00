"""The gate's reading of object mentions: a claim that an object is in the image, or talk about such things in general.

"It protects people from the sun", "popular with tourists", "as tall as a giraffe" name objects without
saying they are in the picture. The gate does not count those as hallucinations; CHAIR (objects.py) keeps
its standard definition, which counts every mention that is not negated.
"""
from __future__ import annotations

from datagen.quality.negation import denied_spans
from datagen.quality.objects import HEDGES, ObjectMatcher

_SENTENCE_END = frozenset(".!?")
_CLAUSE_END = frozenset(".,;:!?()\"")
# Before a bare plural these make it the object of an action or purpose: "protects people", "for tourists".
GENERIC_LEADS = frozenset(
    "for to among by against between help helps helping allow allows allowing let lets letting protect protects "
    "protecting keep keeps keeping give gives giving provide provides providing offer offers offering attract "
    "attracts attracting serve serves serving invite invites inviting encourage encourages encouraging enable "
    "enables enabling remind reminds warn warns feed feeds feeding entertain entertains welcome welcomes "
    "such like unlike whom than where when as".split()
)
# A sentence with one of these speaks of what is usual, not of this picture.
GENERIC_MARKERS = frozenset(
    "often usually typically generally commonly frequently always sometimes tend tends ideal perfect suitable "
    "popular designed intended meant".split()
)
# Within a few words before: a comparison or figure of speech ("looks like a giraffe", "bigger than a car").
COMPARISON_LEADS = frozenset("like unlike resembling resembles resemble resembled reminiscent similar than imitating "
                             "imitates mimicking mimics".split())
COMPARISON_WINDOW = 3
_DETERMINERS = frozenset("a an the this that these those his her its their our my your one two three four five "
                         "some any each every another several few many both".split())
_INDEFINITE = frozenset({"a", "an", "any", "some"})
# Plurals that do not end in "s" (the synonym table lists them as names of their category).
IRREGULAR_PLURALS = frozenset("people men women children gentlemen fishermen policemen mice sheep geese feet".split())
# After a bare plural: "benches like these", "shade like this" speak of a kind.
_KIND_FOLLOWERS = frozenset({"like", "such"})


# Before a bare plural of people, these say they are in view: "there are tourists", "I can see people".
_PRESENCE_CUES = frozenset("there see sees seen saw shows show showing features featuring includes including contains "
                           "containing depicts depicting notice noticed group crowd couple lot number "
                           "pair few".split())
_PEOPLE_QUANTIFIERS = frozenset("many most some all".split())
# Before a plural these make it a definite count or amount of people in view ("seven people", "numerous people").
_COUNTING_WORDS = frozenset("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                            "twenty dozen dozens hundreds thousands several numerous multiple few couple both".split())
_BE = frozenset("are were is was".split())
_PLACE_WORDS = frozenset("in on at near by around inside outside behind beside under visible present seen gathered "
                         "seated lined scattered standing sitting".split())
_PEOPLE_ACTIONS = frozenset("sit sits stand stands walk walks wait waits ride rides gather gathers crowd crowds watch "
                            "stroll strolls play plays queue line lie rest relax swim surf ski".split())
_NOT_ACTIONS = frozenset("during morning evening nothing something anything thing things king spring ceiling "
                         "building buildings clothing".split())
_OBJECT_PRONOUNS = frozenset("their them his him its our us my your".split())
_VERB_LEADS = frozenset("to or and can could will would should might may must".split())
_ARTICLES = frozenset("a an the some this these those".split())
_ACTIVITY_VERBS = frozenset("watch watching watched play playing played".split())


def _sentence_bounds(tokens: list[str], i: int) -> tuple[int, int]:
    start = i
    while start > 0 and tokens[start - 1] not in _SENTENCE_END:
        start -= 1
    end = i
    while end < len(tokens) and tokens[end] not in _SENTENCE_END:
        end += 1
    return start, end


def _asserted_people(tokens: list[str], start: int, end: int) -> bool:
    """For a bare plural of people: "there are people", "I see tourists", or a clause that opens with them
    and says where they are or what they do ("People are walking", "Tourists gather near the gate")."""
    clause_start = start
    while clause_start > 0 and tokens[clause_start - 1] not in _CLAUSE_END:
        clause_start -= 1
    before = tokens[clause_start:start]
    if any(t in _PRESENCE_CUES for t in before[-4:]):
        return True
    if [t for t in before if t not in _PEOPLE_QUANTIFIERS]:
        return False  # not the subject that opens the clause: "visible to drivers and people passing by"
    after = tokens[end:end + 2] + [".", "."]
    if after[0] in _BE and (after[1].endswith("ing") or after[1] in _PLACE_WORDS):
        return True
    return after[0] in _PEOPLE_ACTIONS or (after[0].endswith("ing") and after[0] not in _NOT_ACTIONS)


def is_generic(tokens: list[str], start: int, end: int, category: str = "") -> bool:
    """Whether the mention at tokens[start:end] speaks of such objects in general rather than one in the image."""
    prev = tokens[start - 1] if start > 0 else "."
    lead = tokens[max(0, start - COMPARISON_WINDOW):start]
    if any(t in COMPARISON_LEADS for t in lead) and not any(t in _CLAUSE_END for t in lead):
        return True
    # "a meal for one person", "a bowl for the dog": who or what a thing is for, not what is there.
    if "for" in tokens[max(0, start - 3):start] and not any(t in _CLAUSE_END for t in tokens[max(0, start - 3):start]):
        return True
    word = tokens[end - 1]
    nxt = tokens[end] if end < len(tokens) else "."
    # A bare singular after "by" is a means ("by ship", "by car"); a word before a pronoun object is a verb
    # ("owners train their pets").
    if prev == "by" and not word.endswith("s") or nxt in _OBJECT_PRONOUNS:
        return True
    # "... or cook a family dinner", "to train the dog": a word between an auxiliary or "to" and an article is a verb.
    if prev in _VERB_LEADS and nxt in _ARTICLES:
        return True
    # "watch television", "play frisbee": an activity, not a thing in view.
    if prev in _ACTIVITY_VERBS:
        return True
    plural = word.endswith("s") or word in IRREGULAR_PLURALS
    # Before a plural, "that"/"this" cannot be the (singular) demonstrative: "so that drivers pay" is a conjunction.
    determined = (prev in _DETERMINERS or prev in _COUNTING_WORDS) and not (plural and prev in ("that", "this"))
    if category == "person" and plural and (not determined or prev in _PEOPLE_QUANTIFIERS
                                            or prev == "their") and not prev.isdigit():
        # People spoken of as a kind are the commonest generic talk in reasoning answers (issue 11).
        return not _asserted_people(tokens, start, end)
    plural = word.endswith("s") or word in IRREGULAR_PLURALS
    bare_plural = plural and prev not in _DETERMINERS and not prev.isdigit()
    if bare_plural and (prev in GENERIC_LEADS or nxt in _KIND_FOLLOWERS):
        return True
    s0, s1 = _sentence_bounds(tokens, start)
    sentence = tokens[s0:s1]
    # In a sentence about what is usual, "a person", "tourists" and "their friends" are anyone's.
    if (bare_plural or prev in _INDEFINITE or prev == "their") and any(t in GENERIC_MARKERS for t in sentence):
        return True
    return False


def _hedged(tokens: list[str], start: int) -> bool:
    for j in range(start - 1, -1, -1):
        if tokens[j] in _SENTENCE_END:
            return False
        if tokens[j] in HEDGES:
            return True
    return False


def asserted_categories(text: str, matcher: ObjectMatcher, include_hedged: bool) -> set[str]:
    """Categories the text says are in the image: named, not denied (before or after), not generic, not hedged."""
    tokens, spans = denied_spans(text, matcher)
    asserted: set[str] = set()
    for start, end, category, denied in spans:
        if category in asserted or denied or is_generic(tokens, start, end, category):
            continue
        if include_hedged or not _hedged(tokens, start):
            asserted.add(category)
    return asserted
