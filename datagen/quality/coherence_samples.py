"""Good conversations made from real COCO captions, and planted defects, that measure the coherence checks
(paraphrased_question, subject_mismatch, self_reference; datagen/quality/coherence.py).

Each good conversation asks about the subject one caption opens with ("What is the woman doing?" answered by
that caption), about the scene (another caption), about a count (from the boxes) and where the subject is (a
caption opening with the same kind of subject). Answers are the annotators' own sentences, so the good side
is real text. Two template sets, as in datagen/quality/eval_samples.py: "dev" (val2017 images; the checks
were tuned on these) and "heldout" (train2017 images, other wording and other planted phrasings; written
before the checks were run on them and never used to tune them). The planted defects are made here from what
this module knows (which question, which subject), not by the checks' own parsers.

Rates: python -m datagen.quality.coherence_samples --coco-root ../shared/coco-mini
"""
from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path

from datagen.coco import CocoIndex, ImageRecord
from datagen.quality.coherence import FEMALE, MALE, POSTURES, SUPERCATEGORY_OF, SWAP_GROUPS
from datagen.quality.eval_samples import TEMPLATE_SETS, article, conversation, number, plural
from datagen.quality.objects import ObjectMatcher, default_matcher, tokenize

FAMILY_CODES = {"paraphrase": ("paraphrased_question",), "subject": ("subject_mismatch",),
                "selfref": ("self_reference",)}

TEMPLATES = {
    "dev": {
        "subject_q": ("What is the {subj} doing?", "What can you tell me about the {subj}?"),
        "scene_q": ("What is happening in this picture?", "Can you describe the scene?"),
        "count_q": "How many {objs} are there?",
        "count_a": ("There is one {obj}.", "There are {n} {objs}."),
        "where_q": "Where is the {subj}?",
        "posture_q": ("Where is the {subj} {posture}?", "What is the {subj} {posture} next to?"),
        # Restating the subject question: the question with words added at the end, or in the middle.
        "restate_end": (" in this picture", " right now", " {loc}"),
        "restate_mid": ("young", "tall", "smiling"),
        "self_ref": ("As I mentioned earlier, the {subj} is the main subject.",
                     "This matches the description above.",
                     "The {subj} I described before stands out the most."),
    },
    "heldout": {
        "subject_q": ("Could you describe what the {subj} is up to?", "What is going on with the {subj}?"),
        "scene_q": ("Can you describe the overall scene?", "What does this photo show?"),
        "count_q": "Can you count the {objs}?",
        "count_a": ("I count a single {obj}.", "I count {n} {objs}."),
        "where_q": "Where can the {subj} be found?",
        "posture_q": ("Why is the {subj} {posture} there?", "What is the {subj} {posture} beside?"),
        "restate_end": (" at this moment", " over there", " {loc}"),
        "restate_mid": ("older", "nearby", "main"),
        "self_ref": ("Like I said before, the {subj} is what the picture is about.",
                     "Going back to my previous answer, the {subj} is in the middle of it all.",
                     "As stated above, the scene is calm.",
                     "I already pointed out the {subj}.",
                     "As noted previously, nothing else stands out."),
    },
}
# Subject swaps that contradict the question: the other gender, or another member of the same group.
GENDER_SWAP = {"woman": "man", "man": "woman", "women": "men", "men": "women", "girl": "boy", "boy": "girl",
               "lady": "guy", "guy": "lady", "girls": "boys", "boys": "girls", "mother": "father", "father": "mother"}
SIBLING = {"dog": "cat", "cat": "dog", "horse": "cow", "cow": "horse", "elephant": "bear",
           "bear": "elephant", "zebra": "giraffe", "giraffe": "zebra", "bird": "dog", "car": "truck", "truck": "car",
           "bus": "train", "train": "bus", "boat": "airplane", "airplane": "boat", "bicycle": "motorcycle",
           "motorcycle": "bicycle", "pizza": "sandwich", "sandwich": "pizza", "cake": "pizza", "donut": "cake",
           "banana": "apple", "apple": "banana", "broccoli": "carrot", "carrot": "broccoli", "hot dog": "sandwich"}


def sentence(caption: str) -> str:
    """A caption as an answer sentence: capitalised, one final full stop."""
    text = " ".join(caption.strip().split()).rstrip(" .")
    return text[0].upper() + text[1:] + "."


def opening_subject(caption: str, matcher: ObjectMatcher) -> tuple[str, str] | None:
    """(category, word) of the object a caption opens with ("A young woman ..." -> person, woman)."""
    tokens, found = matcher.scan(caption)
    if not found:
        return None
    start, key, category = found[0]
    if start > 3:
        return None
    return category, " ".join(key)


def gender(word: str) -> str | None:
    return "female" if word in FEMALE else "male" if word in MALE else None


def _location(captions: list[str]) -> str | None:
    """A place phrase from the captions ("in a kitchen" -> "in the kitchen"), or None."""
    for caption in captions:
        tokens = tokenize(caption)
        for i in range(len(tokens) - 2):
            if tokens[i] in ("in", "on", "at") and tokens[i + 1] in ("a", "an", "the") and tokens[i + 2].isalpha():
                return f"{tokens[i]} the {tokens[i + 2]}"
    return None


# The posture a planted answer claims instead: one the question's posture excludes.
POSTURE_SWAP = {"standing": "sitting", "sitting": "standing", "lying": "sitting", "kneeling": "standing",
                "walking": "sitting", "running": "sitting"}
POSTURE_FORMS = {"standing": ("standing", "stands"), "sitting": ("sitting", "sits", "seated"),
                 "lying": ("lying", "laying", "lies"), "kneeling": ("kneeling",), "walking": ("walking", "walks"),
                 "running": ("running", "runs")}


def posture_of(caption: str) -> str | None:
    """The posture a caption gives ("A woman standing in ..." -> standing), or None."""
    return next((POSTURES[w] for w in tokenize(caption) if w in POSTURES), None)


def swap_posture(answer: str, posture: str) -> str | None:
    """The answer with each word of its posture replaced by one the posture excludes, or None if it has none."""
    words = answer.split(" ")
    forms = POSTURE_FORMS[posture]
    changed = [POSTURE_SWAP[posture] + w[len(w.rstrip(".,;!?")):] if w.lower().rstrip(".,;!?") in forms else w
               for w in words]
    return " ".join(changed) if changed != words else None


def _swap_opening(answer: str, word: str, swap: str) -> str | None:
    """The answer with the subject word among its first five words replaced, or None if it is not there."""
    tokens = answer.split(" ")
    for i, token in enumerate(tokens[:5]):
        if token.lower().strip(".,") == word.split()[0]:
            tokens[i] = swap if token.islower() else swap.capitalize()
            return " ".join(tokens)
    return None


class CoherenceWriter:
    """Collects good and planted records for one template set."""

    def __init__(self, kind: str, matcher: ObjectMatcher) -> None:
        self.kind, self.t, self.matcher = kind, TEMPLATES[kind], matcher
        self.coco_split = TEMPLATE_SETS[kind]
        self.records: list[dict] = []

    def add(self, record: ImageRecord, family: str, pairs: list[tuple[str, str]], planted: str | None = None,
            name: str = "") -> None:
        suffix = f"-{name}" if name else ""
        self.records.append({
            "id": f"{record.id:012d}-{family}{suffix}{'-bad' if planted else ''}", "image": record.file_name,
            "conversations": conversation(pairs), "split": "conversation",
            "meta": {"family": family, "planted": planted, "set": self.kind, "coco_split": self.coco_split},
        })

    def good_pairs(self, record: ImageRecord, rng: random.Random) -> tuple[list[tuple[str, str]], dict] | None:
        """The good conversation and what was used to make it, or None when no caption opens with an object."""
        captions = list(record.captions)
        rng.shuffle(captions)
        opened = [(c, opening_subject(c, self.matcher)) for c in captions]
        usable = [(c, s) for c, s in opened if s is not None]
        if len(usable) < 2:
            return None
        main, (category, word) = usable[0]
        others = [c for c in captions if c != main]
        same = [c for c, s in usable[1:] if s[0] == category and gender(s[1]) in (None, gender(word))
                and (category != "person" or gender(word) is None or gender(s[1]) == gender(word))]
        t = self.t
        pairs = [(rng.choice(t["subject_q"]).format(subj=word), sentence(main)),
                 (rng.choice(t["scene_q"]), sentence(others[0]))]
        counts = Counter(o.category for o in record.objects if not o.iscrowd)
        countable = [c for c in counts if c not in ("skis", "scissors")]
        if countable:
            obj = rng.choice(countable)
            n = counts[obj]
            answer = t["count_a"][0].format(obj=obj) if n == 1 else t["count_a"][1].format(n=number(n), objs=plural(obj))
            pairs.append((t["count_q"].format(objs=plural(obj)), answer))
        if same:
            pairs.append((t["where_q"].format(subj=word), sentence(same[0])))
        return pairs, {"word": word, "category": category, "main": main, "others": others,
                       "loc": _location(captions)}

    def write(self, record: ImageRecord, rng: random.Random, family: str) -> None:
        made = self.good_pairs(record, rng)
        if made is None:
            return
        pairs, used = made
        self.add(record, family, pairs)
        word, t = used["word"], self.t
        if family == "paraphrase":
            first_q = pairs[0][0]
            extra_answer = sentence(used["others"][-1])
            for j, end in enumerate(t["restate_end"]):
                if "{loc}" in end and not used["loc"]:
                    continue
                restated = first_q.rstrip("?") + end.format(loc=used["loc"]) + "?"
                self.add(record, family, pairs + [(restated, extra_answer)], "paraphrased_question", f"end{j}")
            adjective = rng.choice(t["restate_mid"])
            restated = first_q.replace(f"the {word}", f"the {adjective} {word}", 1)
            self.add(record, family, pairs + [(restated, extra_answer)], "paraphrased_question", "mid")
        elif family == "subject":
            # A question that takes the subject's posture for granted, answered by a caption that agrees.
            posture = posture_of(used["main"])
            if posture is not None:
                agreeing = [c for c in [*used["others"], used["main"]] if posture_of(c) == posture]
                question = rng.choice(t["posture_q"]).format(subj=word, posture=posture)
                answer = sentence(agreeing[0])
                with_posture = pairs + [(question, answer)]
                self.add(record, family, with_posture, name="posture")
                swapped = swap_posture(answer, posture)
                if swapped is not None:
                    self.add(record, family, pairs + [(question, swapped)], "subject_mismatch", "posture")
            swap = GENDER_SWAP.get(word) if used["category"] == "person" else SIBLING.get(word)
            if swap is None or (used["category"] != "person" and SUPERCATEGORY_OF.get(used["category"]) not in SWAP_GROUPS):
                return
            # The subject question's answer, and the where-question's (the last pair when it was asked).
            asked_where = len(pairs) > 2 and pairs[-1][0] == t["where_q"].format(subj=word)
            for k, name in ((0, "swap"), (len(pairs) - 1, "swap-where")) if asked_where else ((0, "swap"),):
                swapped = _swap_opening(pairs[k][1], word, swap)
                if swapped is not None:
                    bad = list(pairs)
                    bad[k] = (pairs[k][0], swapped)
                    self.add(record, family, bad, "subject_mismatch", name)
        elif family == "selfref":
            for j, phrase in enumerate(t["self_ref"]):
                bad = list(pairs)
                k = len(bad) - 1
                bad[k] = (bad[k][0], bad[k][1] + " " + phrase.format(subj=word))
                self.add(record, family, bad, "self_reference", f"ref{j}")


def build_coherence_records(kind: str, coco_root: Path, matcher: ObjectMatcher | None = None) -> list[dict]:
    """Good and planted records of one template set over its COCO split's images (deterministic)."""
    index = CocoIndex(coco_root, TEMPLATE_SETS[kind])
    writer = CoherenceWriter(kind, matcher or default_matcher())
    for image_id in index.image_ids():
        record = index.record(image_id)
        for round_ in range(2):  # two draws per image and family: over 100 good samples each
            for family in FAMILY_CODES:
                writer.write(record, random.Random(f"{kind}:{image_id}:{family}:{round_}"), family)
    seen: set[str] = set()
    for rec in writer.records:
        while rec["id"] in seen:
            rec["id"] += "-2"
        seen.add(rec["id"])
    return writer.records


NEW_CODES = ("paraphrased_question", "subject_mismatch", "self_reference")
# A planted restated question counts as caught by either question check: the nearer ones are repeated_question's.
CATCHING_CODES = {"paraphrase": ("paraphrased_question", "repeated_question"), "subject": ("subject_mismatch",),
                  "selfref": ("self_reference",)}
FIXTURE_FILES = ("good_samples.jsonl", "good_samples_heldout.jsonl", "split_samples_handwritten.jsonl",
                 "split_samples_handwritten_heldout.jsonl", "split_samples_handwritten_final.jsonl",
                 "llava_format_sample.json")


def good_sets(kind: str, coco_root: Path, fixtures: Path | None) -> dict[str, list[dict]]:
    """Good samples to measure false rejects on: this module's conversations, the other checks' template
    samples (datagen.quality.eval_samples) and, for the held-out kind, the hand-written fixtures."""
    from datagen.quality.eval_samples import build_records  # the other families' samples: only for measuring
    from datagen.sample import read_samples

    sets = {"coherence conversations": [r for r in build_coherence_records(kind, coco_root) if not r["meta"]["planted"]],
            "other checks' templates": [r for r in build_records(kind, coco_root) if not r["meta"]["planted"]]}
    if fixtures is not None:
        handwritten = []
        for name in FIXTURE_FILES:
            handwritten += [r for r in read_samples(fixtures / name)
                            if not (isinstance(r.get("meta"), dict) and r["meta"].get("planted"))]
        sets["hand-written fixtures"] = handwritten
    return sets


def new_rule_rates(kind: str, coco_root: Path, fixtures: Path | None = None) -> dict:
    """False rejects of each new check on every good set, and the planted defects each family catches."""
    from datagen.quality.checks import NEAR_DUPLICATE, QualityChecker  # the registry: only for measuring
    from datagen.quality.config import QualityConfig
    from datagen.quality.view import SampleView

    checker = QualityChecker(QualityConfig(disabled_checks=[NEAR_DUPLICATE]))
    good: dict[str, dict] = {}
    for name, records in good_sets(kind, coco_root, fixtures).items():
        counts = {code: 0 for code in NEW_CODES}
        examples: list[str] = []
        for rec in records:
            split = rec.get("split") if isinstance(rec.get("split"), str) else None
            reasons = checker.check(SampleView.from_record(rec, split=split)).details
            for code in NEW_CODES:
                if code in reasons:
                    counts[code] += 1
                    examples.append(f"{rec.get('id')}: {code}: {reasons[code]}")
        good[name] = {"samples": len(records), "false_rejects": counts, "examples": examples}
    planted: dict[str, dict] = {}
    for rec in build_coherence_records(kind, coco_root):
        family = rec["meta"]["family"]
        if not rec["meta"]["planted"]:
            continue
        reasons = checker.check(SampleView.from_record(rec, split="conversation")).reasons
        entry = planted.setdefault(family, {"planted": 0, "caught": 0, "caught_by_new_code": 0, "missed": []})
        entry["planted"] += 1
        entry["caught"] += any(code in reasons for code in CATCHING_CODES[family])
        entry["caught_by_new_code"] += rec["meta"]["planted"] in reasons
        if not any(code in reasons for code in CATCHING_CODES[family]):
            entry["missed"].append(rec["id"])
    return {"good": good, "planted": planted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco-root", type=Path, required=True)
    parser.add_argument("--fixtures", type=Path, default=Path(__file__).resolve().parents[2] / "tests" / "fixtures",
                        help="Hand-written good samples (counted with the held-out set).")
    parser.add_argument("--show", action="store_true", help="List each false reject and missed plant.")
    args = parser.parse_args()
    for kind in TEMPLATE_SETS:
        result = new_rule_rates(kind, args.coco_root, args.fixtures if kind == "heldout" else None)
        for name, r in result["good"].items():
            rates = ", ".join(f"{code} {n}" for code, n in r["false_rejects"].items())
            print(f"{kind:8s} good  {name:26s} {r['samples']:4d} samples; false rejects: {rates}")
            if args.show:
                print("".join(f"    {line}\n" for line in r["examples"]), end="")
        for family, r in result["planted"].items():
            print(f"{kind:8s} plant {family:26s} {r['planted']:4d} planted; caught {r['caught']} "
                  f"({100 * r['caught'] / r['planted']:.1f}%), by the new code alone {r['caught_by_new_code']}")
            if args.show and r["missed"]:
                print(f"    missed: {', '.join(r['missed'][:20])}")


if __name__ == "__main__":
    main()
