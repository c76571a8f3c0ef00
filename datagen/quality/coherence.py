"""Checks of a conversation's coherence (issue 10): questions that circle back to an earlier one in other words,
an answer whose subject is not the one its question asked about, and answers that refer to their own writing.

Each is a small function (view, env) -> detail or None, registered in datagen.quality.checks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from datagen.quality.minhash import jaccard
from datagen.quality.words import words

if TYPE_CHECKING:  # the check registry imports this module; the types are for reading only
    from datagen.quality.view import CheckEnv, SampleView

# --- paraphrased questions ----------------------------------------------------------------------

_QUESTION_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# Words that carry no topic: what a question is about is in the other words.
_FUNCTION_WORDS = frozenset(
    "a an the this that these those there here it its it's they them their he him his she her hers you your i me my "
    "we our what which who whom whose where when why how is are was were be been being am do does did doing done can "
    "could would should will shall may might must has have had having of in on at to with from by for about into onto "
    "near around over under as and or but if than so very some any one ones kind type sort picture image photo "
    "photograph scene shot view frame visible seen see".split()
)
_AUXILIARIES = frozenset("is are was were am do does did can could would should will shall may might must has have had".split())


@lru_cache(maxsize=8192)
def _stem(word: str) -> str:
    """A crude English stem, enough to match standing/stands/stand and boxes/box; possessives are kept apart."""
    if "'" in word:
        return word
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            base = word[: -len(suffix)]
            if len(base) >= 2 and base[-1] == base[-2] and base[-1] not in "lsz":
                base = base[:-1]  # sitting -> sit, stopped -> stop
            return base
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("es") and re.search(r"(?:s|x|z|ch|sh)es$", word):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        return word[:-1]
    return word


_FUNCTION_STEMS = _FUNCTION_WORDS | {_stem(w) for w in _FUNCTION_WORDS}


def question_words(question: str) -> list[str]:
    """The question's words, lower-cased, in order."""
    return _QUESTION_TOKEN.findall(question.lower())


def question_kind(words: list[str]) -> str:
    """What a question asks for: why, how, how many, yes/no, or which thing (what/where/who/which ...)."""
    if not words:
        return "other"
    first, second = words[0], words[1] if len(words) > 1 else ""
    if first == "why":
        return "why"
    if first == "how":
        return "count" if second in ("many", "much") else "how"
    if first in _AUXILIARIES:
        return "yes/no"
    return "which"


def _inserted_at(shorter: list[str], longer: list[str], max_inserted: int) -> int | None:
    """Where `longer` is `shorter` with one run of at most `max_inserted` words added, or None."""
    extra = len(longer) - len(shorter)
    if not 0 < extra <= max_inserted:
        return None
    start = 0
    while start < len(shorter) and shorter[start] == longer[start]:
        start += 1
    return start if longer[start + extra :] == shorter[start:] else None


@dataclass(frozen=True)
class QuestionShape:
    """What the paraphrase test compares, computed once per question."""

    raw: tuple[str, ...]
    stems: tuple[str, ...]
    content: frozenset[str]
    kind: str

    @classmethod
    def of(cls, question: str) -> "QuestionShape":
        return _shape_of(question)


@lru_cache(maxsize=8192)
def _shape_of(question: str) -> QuestionShape:
    """QuestionShape.of, remembered: a shape is immutable and generated questions recur ("What is the man doing?")."""
    raw = tuple(question_words(question))
    stems = tuple(_stem(w) for w in raw)
    return QuestionShape(raw, stems, frozenset(w for w in stems if w not in _FUNCTION_STEMS), question_kind(list(raw)))


def question_word_sets(view: SampleView, env: CheckEnv) -> list[set[str]]:
    """Each question's set of lower-cased words, made once per sample for the checks that compare questions (read
    them, do not change them)."""
    key = ("question_word_sets", *view.questions)  # keyed by the questions: right even where memo was not cleared
    sets = env.memo.get(key)
    if sets is None:
        sets = env.memo[key] = [set(words(q.lower())) for q in view.questions]
    return sets


def restatement(a: QuestionShape, b: QuestionShape, max_inserted: int, min_shared: int) -> str | None:
    """How question b restates question a, or None: the same question (stemmed) with a modifier added,
    or the same topic words asked with the same question word ("What colour is the car?" / "What is the colour
    of the car?"; not "What is the dog doing?" / "Where is the dog?")."""
    shorter, longer = (a, b) if len(a.stems) <= len(b.stems) else (b, a)
    if len(shorter.stems) >= 3 and shorter.content:
        start = _inserted_at(list(shorter.stems), list(longer.stems), max_inserted)
        if start is not None:
            added = " ".join(longer.raw[start : start + len(longer.stems) - len(shorter.stems)])
            return f"the same question with {added!r} added"
    if (len(a.content) >= min_shared and a.content == b.content and a.raw[:1] == b.raw[:1] and a.kind == b.kind):
        return f"the same words ({', '.join(sorted(a.content))}) asked again"
    return None


def paraphrase_of(a: str, b: str, max_inserted: int, min_shared: int) -> str | None:
    """How question `b` restates question `a` (see `restatement`), or None."""
    return restatement(QuestionShape.of(a), QuestionShape.of(b), max_inserted, min_shared)


def check_paraphrased_question(view: SampleView, env: CheckEnv) -> str | None:
    """No question circles back to an earlier one: the same question with a modifier added, or reworded."""
    questions = view.questions
    if len(questions) < 2:
        return None
    config = env.config
    shapes = [QuestionShape.of(q) for q in questions]
    word_sets = question_word_sets(view, env)
    for i in range(1, len(questions)):
        for j in range(i):
            if word_sets[i] and jaccard(word_sets[i], word_sets[j]) >= config.repeated_question_similarity:
                continue  # repeated_question's case: one defect, one reason
            how = restatement(shapes[j], shapes[i], config.paraphrase_max_inserted_words,
                              config.paraphrase_min_shared_words)
            if how:
                return f"question {i + 1} restates question {j + 1} ({how}): {questions[i][:120]!r}"
    return None


# --- an answer about another subject -----------------------------------------------------------

# COCO's supercategories (instances_*.json "categories"; tests/test_quality_coherence.py compares them).
SUPERCATEGORIES: dict[str, tuple[str, ...]] = {
    "person": ("person",),
    "vehicle": ("bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"),
    "outdoor": ("traffic light", "fire hydrant", "stop sign", "parking meter", "bench"),
    "animal": ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"),
    "accessory": ("backpack", "umbrella", "handbag", "tie", "suitcase"),
    "sports": ("frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
               "surfboard", "tennis racket"),
    "kitchen": ("bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl"),
    "food": ("banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake"),
    "furniture": ("chair", "couch", "potted plant", "bed", "dining table", "toilet"),
    "electronic": ("tv", "laptop", "mouse", "remote", "keyboard", "cell phone"),
    "appliance": ("microwave", "oven", "toaster", "sink", "refrigerator"),
    "indoor": ("book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"),
}
SUPERCATEGORY_OF = {category: group for group, members in SUPERCATEGORIES.items() for category in members}
# Kinds of thing one is easily mistaken for another of: a swap among them contradicts the question.
SWAP_GROUPS = frozenset({"animal", "vehicle", "food"})
FEMALE = frozenset("woman women lady ladies girl girls she her hers mother wife wives daughter sister bride "
                   "grandmother aunt queen actress waitress".split())
MALE = frozenset("man men guy guys boy boys he him his gentleman gentlemen father husband son brother groom "
                 "grandfather uncle king actor waiter policeman policemen fisherman fishermen".split())
# Words that end the opening of a clause: an object named after one of them is not what the clause is about
# ("a dog next to the cat" is about the dog; "what is on the table" asks about what is on it).
_PREPOSITIONS = frozenset("in on at with near by from to into onto under over behind next beside above below across "
                          "through around for against along among between inside outside toward towards than like "
                          "and or but while who which that".split())
_QUESTION_BLOCKERS = _PREPOSITIONS  # "tell me about the woman" asks about her: "about" is not a blocker
_ANSWER_BLOCKERS = _PREPOSITIONS | frozenset({"about"})
QUESTION_WINDOW = 8  # the subject starts within this many words: "what can you tell me about the woman"
ANSWER_WINDOW = 6
def _gender(words: tuple[str, ...] | list[str]) -> str | None:
    found = {"female" for w in words if w in FEMALE} | {"male" for w in words if w in MALE}
    return found.pop() if len(found) == 1 else None


def _opening_subject(tokens: list[str], found: list[tuple[int, tuple[str, ...], str]], blockers: frozenset[str],
                     window: int) -> tuple[str, tuple[str, ...]] | None:
    """(category, words) of the object the clause opens with: within the window, no blocker before it."""
    if not found:
        return None
    start, key, category = found[0]
    if start >= window or any(t in blockers or t in _CLAUSE_BREAKS for t in tokens[:start]):
        return None
    return category, key


_CLAUSE_BREAKS = frozenset(".,;:!?()\"")


def _first_sentence(tokens: list[str]) -> list[str]:
    for i, token in enumerate(tokens):
        if token in (".", "!", "?", ";"):
            return tokens[:i]
    return tokens


# A question that ends on one of these asks for something beside its subject ("What is the woman standing near?",
# "What is the man holding?"): its answer may well open with another person or animal.
_ASKS_FOR_AN_OBJECT = _PREPOSITIONS | frozenset(
    "about of holding carrying watching looking feeding petting eating riding using wearing chasing hugging "
    "touching pulling pushing throwing catching drinking reading doing".split()) - {"doing"}


def subject_mismatch(question: str, answer: str, matcher) -> str | None:
    """Why the answer's subject contradicts what the question asked about, or None."""
    words = question_words(question)
    if words and words[-1] in _ASKS_FOR_AN_OBJECT and words[-2:] != ["up", "to"]:  # "what is she up to" = doing
        return None
    q_tokens, q_found = matcher.scan(question)
    asked = _opening_subject(q_tokens, q_found, _QUESTION_BLOCKERS, QUESTION_WINDOW)
    if asked is None:
        return None
    a_all, a_found_all = matcher.scan(answer)
    a_tokens = _first_sentence(a_all)
    a_found = [f for f in a_found_all if f[0] < len(a_tokens)]
    category, words = asked
    if category == "person":
        asked_gender = _gender(words)
        if asked_gender is None:
            return None
        opening = a_tokens[0] if a_tokens else ""
        said = _opening_subject(a_tokens, a_found, _ANSWER_BLOCKERS, ANSWER_WINDOW)
        said_gender = _gender([opening]) if opening in ("he", "she") else (
            _gender(said[1]) if said is not None and said[0] == "person" else None)
        same_words = FEMALE if asked_gender == "female" else MALE
        if said_gender and said_gender != asked_gender and not same_words & set(a_all):
            return f"asked about the {' '.join(words)}, answered about the {opening if opening in ('he', 'she') else ' '.join(said[1])}"
        return None
    said = _opening_subject(a_tokens, a_found, _ANSWER_BLOCKERS, ANSWER_WINDOW)
    if said is None or said[0] == category:
        return None
    group = SUPERCATEGORY_OF.get(category)
    if group not in SWAP_GROUPS or SUPERCATEGORY_OF.get(said[0]) != group:
        return None
    if any(c == category for _, _, c in a_found_all):
        return None  # the answer speaks of the asked object too ("the cat is chasing the dog")
    return f"asked about the {' '.join(words)}, answered about the {' '.join(said[1])}"


# Postures: a question that takes one for granted ("What is the woman standing in?") is contradicted by an
# answer that gives the same subject one of the postures it excludes ("She is sitting in a living room.").
POSTURES = {"standing": "standing", "stands": "standing", "stand": "standing", "sitting": "sitting", "sits": "sitting",
            "seated": "sitting", "lying": "lying", "laying": "lying", "lies": "lying", "kneeling": "kneeling",
            "walking": "walking", "walks": "walking", "running": "running", "runs": "running"}
# A question states a posture with a participle after its subject ("the woman standing", "who is sitting"):
# "What stands out?" and "Where does it stand?" state none.
_QUESTION_POSTURES = frozenset({"standing", "sitting", "seated", "lying", "laying", "kneeling", "walking", "running"})
_EXCLUDES = {"standing": {"sitting", "lying", "kneeling"}, "sitting": {"standing", "lying", "walking", "running"},
             "lying": {"standing", "sitting", "walking", "running", "kneeling"}, "kneeling": {"standing", "lying"},
             "walking": {"sitting", "lying"}, "running": {"sitting", "lying"}}
_DENIALS = frozenset("no not never neither nor".split())
_PRONOUNS = frozenset("he she they it".split())
POSTURE_REACH = 6  # the posture's subject is among the words before it ("a man in a green shirt is sitting")


def _category_of_word(word: str, matcher) -> str | None:
    return matcher.phrases.get((word,))


def _posture_subject(words: list[str], at: int, matcher) -> tuple[str, str] | None:
    """(category or 'who' or the pronoun, the word) of the nearest subject before a posture word, else None."""
    for word in reversed(words[max(0, at - POSTURE_REACH) : at]):
        if word == "who" or word in _PRONOUNS:
            return word, word
        category = _category_of_word(word, matcher)
        if category is not None:
            return category, word
    return None


def _same_subject(asked: tuple[str, str], said: tuple[str, str]) -> bool:
    """Whether the answer's posture belongs to the question's subject: 'who' or a pronoun, or the same
    category (for people, not the other gender: "a man sitting" does not answer for "the woman standing")."""
    if asked[0] == "who" or said[0] in _PRONOUNS:
        return True
    if asked[0] != said[0]:
        return False
    genders = {_gender([asked[1]]), _gender([said[1]])} - {None}
    return len(genders) < 2


def posture_mismatch(question: str, answer: str, matcher) -> str | None:
    """Why the answer gives the question's subject a posture the question's own excludes, or None."""
    q_words = question_words(question)
    if not q_words or q_words[0] in _AUXILIARIES:
        return None  # "Is the man standing?" asks; "No, he is sitting." answers
    asked = subject = None
    for i, word in enumerate(q_words):
        if word in _QUESTION_POSTURES:
            subject = _posture_subject(q_words, i, matcher)
            if subject is not None:
                asked = POSTURES[word]
                break
    if asked is None:
        return None
    a_words = question_words(answer)
    if any(POSTURES.get(w) == asked for w in a_words) or any(w in _DENIALS for w in a_words):
        return None
    first = question_words(re.split(r"[.!?;]", answer, maxsplit=1)[0])
    for i, word in enumerate(first):
        said = POSTURES.get(word)
        if said is None:
            continue
        whose = _posture_subject(first, i, matcher)
        if whose is not None and _same_subject(subject, whose) and said in _EXCLUDES[asked]:
            return f"asked about {asked}, answered {said}"
    return None


def check_subject_mismatch(view: SampleView, env: CheckEnv) -> str | None:
    """Each answer is about its question's subject: asked about the woman, it does not open with the man;
    asked what the standing woman does, it does not say she is sitting."""
    if view.split == "negative":
        return None  # a negative answer may well open with what is there instead of the absent object
    questions, answers = view.questions, view.answers
    for i, (question, answer) in enumerate(zip(questions, answers)):
        why = subject_mismatch(question, answer, env.matcher) or posture_mismatch(question, answer, env.matcher)
        if why:
            return f"answer {i + 1} {why}"
    return None


# --- answers that refer to their own writing --------------------------------------------------

_SAYING_WORDS = ("mentioned", "said", "noted", "stated", "described", "explained", "discussed", "pointed out",
                 "indicated")
_SAYING = "(?:" + "|".join(_SAYING_WORDS) + ")"
_WRITING_NOUNS = ("description", "answer", "response", "explanation", "paragraph", "passage", "summary", "reply",
                  "message", "turn")
# Matched on lower-cased text (a plain pattern is faster than re.IGNORECASE; the detail quotes the lower case).
_SELF_REFERENCE = re.compile(
    rf"\bas (?:i|we|previously|already|earlier) (?:have |had |already )?{_SAYING}"
    rf"|\bas {_SAYING} (?:earlier|above|before|previously|in (?:my|the) (?:previous|earlier|last|first))\b"
    rf"|\b{_SAYING} (?:earlier|above|before|previously)\b"
    rf"|\b(?:i|we) (?:have |had |already |just )?{_SAYING}\b"
    r"|\b(?:the|my) (?:description|answer|response|explanation|paragraph|passage|summary) (?:above|below)\b"
    r"|\b(?:the|my) (?:above|previous|earlier|preceding|prior|last|first) (?:description|answer|response|explanation|"
    r"paragraph|passage|summary|reply)\b"
    r"|\b(?:in|from) (?:my|the) (?:previous|earlier|last|prior|first) (?:answer|response|reply|message|turn)\b"
)


def _may_refer_to_writing(lowered: str) -> bool:
    """The prefilter: every match holds a verb of saying, or a noun for a piece of writing."""
    return any(w in lowered for w in _SAYING_WORDS) or any(w in lowered for w in _WRITING_NOUNS)


def check_self_reference(view: SampleView, env: CheckEnv) -> str | None:
    """No answer refers to the writing itself ("as I mentioned", "the description above", "mentioned earlier")."""
    answers = [answer.lower() for answer in view.answers]
    if not _may_refer_to_writing("\n".join(answers)):
        return None
    for lowered in answers:
        found = _SELF_REFERENCE.search(lowered)
        if found:
            return f"answer says {found.group(0)!r}"
    return None
