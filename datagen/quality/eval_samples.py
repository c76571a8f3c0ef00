"""Good samples and planted errors that measure the negative, grounded, counting, placement and
generic-mention checks (datagen/quality/evaluate.py --families runs them).

The samples are composed from COCO annotations with sentence templates written for this purpose. Two
template sets: "dev" (val2017 images; the checks were tuned on these) and "heldout" (train2017 images,
other wording; never used for tuning). The planted errors are made here, from what this script knows
about each sentence (which count, which box, which relation), not by the checks' own parsers.

Rates: python -m datagen.quality.eval_samples --coco-root ../shared/coco-mini --report \
           --handwritten tests/fixtures/split_samples_handwritten*.jsonl
Write them as JSONL to read: python -m datagen.quality.eval_samples --coco-root ../shared/coco-mini --out-dir /tmp/x
"""
from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

from datagen.outputs import write_text_atomic
from datagen.coco import CocoIndex, ImageRecord
from datagen.context import context_builder, normalised_box
from datagen.quality.objects import default_matcher, ground_truth

# Which COCO split each template set's images come from.
TEMPLATE_SETS = {"dev": "val2017", "heldout": "train2017"}
PLURALS = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep", "bus": "buses",
           "wine glass": "wine glasses", "skis": "skis", "scissors": "scissors", "couch": "couches",
           "sandwich": "sandwiches", "bench": "benches", "dining table": "dining tables", "toothbrush": "toothbrushes",
           "hot dog": "hot dogs", "tennis racket": "tennis rackets", "teddy bear": "teddy bears", "skateboard": "skateboards"}
NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()
COLOURS = ("brown", "white", "black", "grey", "red")


def plural(name: str) -> str:
    if name in PLURALS:
        return PLURALS[name]
    return name + ("es" if name.endswith(("s", "x", "ch", "sh")) else "s")


def article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def number(n: int) -> str:
    return NUMBERS[n] if n < len(NUMBERS) else str(n)


def conversation(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    turns = []
    for i, (q, a) in enumerate(pairs):
        turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + q})
        turns.append({"from": "gpt", "value": a})
    return turns


def scene(record: ImageRecord) -> str:
    caption = record.captions[0].strip().rstrip(".")
    return caption[0].lower() + caption[1:]


def present_names(record: ImageRecord) -> list[str]:
    counts = Counter(o.category for o in record.objects)
    return [c for c, _ in counts.most_common()]


# --- templates -----------------------------------------------------------------------------------

TEMPLATES = {
    "dev": {
        "neg_q": ("Is there {a_obj} in this picture?", "What colour is the {obj}?", "What is the {obj} doing?",
                  "Where is the {obj} standing?", "Can you spot {a_obj} anywhere?"),
        "neg_a": ("There is no {obj} in this picture. Instead, it shows {scene}.",
                  "No {obj} can be seen here. The photo shows {scene}.",
                  "The picture does not contain {a_obj}; it shows {scene}.",
                  "There isn't {a_obj} anywhere in the scene. What is there is {scene}."),
        "neg_affirm": "The {obj} is {colour} and stays close to the {present}.",
        "neg_other": " There is also {a_other} near the {present}.",
        "neg_scope": "The {obj} is not asleep; it is right next to the {present}.",
        "ground_qa": (("What is in the region {box}?", "That region shows {a_obj} {box}."),
                      ("Where is the {obj}?", "The {obj} {box} is in the {where} part of the picture."),
                      ("What can be found at {box}?", "At that spot there is {a_obj} {box}.")),
        "count_one": ("There is one {obj} in the picture.", "I can see a single {obj}."),
        "count_many": ("There are {n} {objs} in the picture.", "The image shows {n} {objs}."),
        "count_vague": "Several {objs} are visible.",
        "count_subset": "One of the {objs} is closer to the camera than the others.",
        "count_q": "How many {objs} are there?",
        "count_over": "There are {n} {objs} in the picture.",
        "count_under": "There are only {n} {objs} in the picture.",
        "count_vague_bad": "Several {objs} are visible.",
        "place": {"left": "The {a} is to the left of the {b}.", "right": "The {a} is on the right of the {b}.",
                  "above": "The {a} is above the {b}.", "below": "The {a} is below the {b}."},
        "place_q": "Where is the {a} compared to the {b}?",
        "generic": ("Benches like these give people a place to rest while they wait.",
                    "Such a spot is popular with tourists who want a quiet view.",
                    "A setup like this is designed for people who enjoy cooking at home.",
                    "Shade like this protects people from the midday sun.",
                    "A place like this is usually meant for a person who needs a quick break.",
                    "This kind of meal is typically enjoyed by friends sharing a table.",
                    "The arrangement makes the space easy to use for customers.",
                    "From a distance the shape looks like a small dog.",
                    "The colours would appeal to children walking past.",
                    "Scenes like this are often shared by travellers and their friends."),
        "reason_q": ("What makes this scene inviting?", "Why might this place have been set up this way?",
                     "What purpose does this setting serve?"),
        "plant": ("There is also {a_obj} in the background.", "Two {objs} are visible near the edge.",
                  "A man is standing at the edge of the frame."),
    },
    "heldout": {
        "neg_q": ("Could you describe the {obj} near the {present}?", "Why is the {obj} next to the {present}?",
                  "Does the photo include any {objs}?", "Tell me about the {obj} in the background.",
                  "How old does the {obj} look?"),
        "neg_a": ("Actually, the photo has no {obj} at all. What you can see is {scene}.",
                  "You won't find {a_obj} here; the image shows {scene}.",
                  "There's no sign of {a_obj} in this image. It shows {scene}.",
                  "Nothing like {a_obj} appears in the photo. It is {scene}."),
        "neg_affirm": "Yes, the {obj} is right there beside the {present}, looking {colour}.",
        "neg_other": " {A_other} can be seen behind it as well.",
        "neg_scope": "The {obj} isn't moving; it waits by the {present}.",
        "ground_qa": (("Which object occupies {box}?", "It is {a_obj} {box}."),
                      ("Can you point out the {obj}?", "Yes, the {obj} is located at {box}."),
                      ("Describe the area {box}.", "The area holds {a_obj} {box}, seen in the {where} of the frame.")),
        "count_one": ("Just one {obj} appears in the photo.", "The photo has only one {obj}."),
        "count_many": ("Altogether {n} {objs} can be counted.", "The photo contains {n} {objs}."),
        "count_vague": "Quite a few {objs} fill the scene.",
        "count_subset": "Two of the {objs} stand apart from the rest.",
        "count_q": "Can you count the {objs}?",
        "count_over": "Altogether {n} {objs} can be counted.",
        "count_under": "The photo contains exactly {n} {objs}.",
        "count_vague_bad": "Numerous {objs} fill the scene.",
        "place": {"left": "Looking at the photo, the {a} appears left of the {b}.",
                  "right": "The {a} sits to the right of the {b}.",
                  "above": "The {a} is positioned on top of the {b} in the frame.",
                  "below": "The {a} is positioned beneath the {b}."},
        "place_q": "How are the {a} and the {b} arranged?",
        "generic": ("Places like this help workers take a short break.",
                    "Such a table is ideal for students who need a quiet place.",
                    "It is the kind of view that attracts shoppers on a weekend.",
                    "Outdoor seating of this kind typically welcomes customers and their friends.",
                    "The sculpture resembles a horse from the side.",
                    "Fresh food like this feeds people in the neighbourhood.",
                    "The scene would remind kids of a day out.",
                    "Among drivers, a spot like this is known as a good place to stop.",
                    "Such streets are generally busy with pedestrians at rush hour.",
                    "The object is bigger than a cat but smaller than a bus."),
        "reason_q": ("What does this scene suggest about the place?", "What is this setting likely used for?",
                     "Why would someone take a picture like this?"),
        "plant": ("You can spot {a_obj} on the left.", "A {obj} is resting close by.",
                  "Two people are chatting in the corner."),
    },
}


def fill(template: str, **values: str) -> str:
    return template.format(**values)


class Writer:
    """Collects good and planted records for one template set."""

    def __init__(self, kind: str, coco_split: str) -> None:
        self.kind = kind
        self.t = TEMPLATES[kind]
        self.coco_split = coco_split
        self.records: list[dict] = []

    def add(self, record: ImageRecord, family: str, split: str, pairs: list[tuple[str, str]], planted: str | None = None,
            name: str = "", meta: dict | None = None) -> None:
        suffix = f"-{name}" if name else ""
        self.records.append({
            "id": f"{record.id:012d}-{family}{suffix}{'-bad' if planted else ''}",
            "image": record.file_name, "conversations": conversation(pairs), "split": split,
            "meta": {"family": family, "planted": planted, "set": self.kind, "coco_split": self.coco_split,
                     **(meta or {})},
        })

    # --- negative ---

    def negative(self, record: ImageRecord, absent: list[str], rng: random.Random) -> None:
        present = present_names(record)
        if not present or len(absent) < 2:
            return
        obj, other = absent[0], absent[1]
        p = rng.choice(present)
        values = dict(obj=obj, a_obj=article(obj), objs=plural(obj), present=p, scene=scene(record),
                      a_other=article(other), A_other=article(other).capitalize(), colour=rng.choice(COLOURS))
        q = fill(rng.choice(self.t["neg_q"]), **values)
        a = fill(rng.choice(self.t["neg_a"]), **values)
        q2_obj = absent[2] if len(absent) > 2 else None
        pairs = [(q, a)]
        if q2_obj:
            v2 = {**values, "obj": q2_obj, "a_obj": article(q2_obj), "objs": plural(q2_obj)}
            pairs.append((fill(rng.choice(self.t["neg_q"]), **v2), fill(rng.choice(self.t["neg_a"]), **v2)))
        meta = {"absent_objects": absent}
        self.add(record, "negation", "negative", pairs, meta=meta)
        self.add(record, "negation", "negative", [(q, fill(self.t["neg_affirm"], **values))] + pairs[1:],
                 "absent_not_denied", "affirm", meta)
        self.add(record, "negation", "negative", [(q, f"It shows {values['scene']}.")] + pairs[1:],
                 "absent_not_denied", "ignore", meta)
        self.add(record, "negation", "negative", [(q, fill(self.t["neg_scope"], **values))] + pairs[1:],
                 "absent_not_denied", "scope", meta)
        self.add(record, "negation", "negative", [(q, a + fill(self.t["neg_other"], **values))] + pairs[1:],
                 "absent_object_named", "other", meta)

    # --- grounded ---

    def grounded(self, record: ImageRecord, rng: random.Random) -> None:
        objs = [o for o in record.objects if not o.iscrowd and o.bbox[2] * o.bbox[3] > 0.01 * record.width * record.height]
        if not objs:
            return
        chosen = rng.sample(objs, min(3, len(objs)))
        pairs, planted = [], []
        for k, o in enumerate(chosen):
            box = normalised_box(o, record.width, record.height)
            cx = (box[0] + box[2]) / 2
            where = "left" if cx < 0.4 else "right" if cx > 0.6 else "middle"
            q, a = self.t["ground_qa"][k % len(self.t["ground_qa"])]
            values = dict(obj=o.category, a_obj=article(o.category), box=str(box), where=where)
            pairs.append((fill(q, **values), fill(a, **values)))
            same = [normalised_box(x, record.width, record.height) for x in record.objects if x.category == o.category]
            planted.append((k, q, a, values, box, same))
        self.add(record, "grounding", "grounded", pairs)
        k, q, a, values, box, same = planted[0]
        w, h = box[2] - box[0], box[3] - box[1]
        # Shifted by its own size (right/down, or left/up near the edge): IoU with its true box falls below 0.5.
        dx = w if box[2] + w <= 1 else -w
        dy = h if box[3] + h <= 1 else -h
        moved = [round(box[0] + dx, 3), round(box[1] + dy, 3), round(box[2] + dx, 3), round(box[3] + dy, 3)]
        if all(_iou(moved, s) < 0.5 for s in same) and all(0 <= v <= 1 for v in moved):
            self._ground_bad(record, pairs, k, q, a, values, str(moved), "invented_box", "shifted")
        others = [x for x in record.objects if x.category != values["obj"]]
        if others:
            other_box = normalised_box(rng.choice(others), record.width, record.height)
            if all(_iou(other_box, s) < 0.5 for s in same):
                self._ground_bad(record, pairs, k, q, a, values, str(other_box), "invented_box", "wrongcat")
        made = [round(rng.uniform(0, 0.5), 3), round(rng.uniform(0, 0.5), 3)]
        made += [round(made[0] + rng.uniform(0.05, 0.4), 3), round(made[1] + rng.uniform(0.05, 0.4), 3)]
        truth = [normalised_box(x, record.width, record.height) for x in record.objects]
        if all(_iou(made, s) < 0.5 for s in truth):
            self._ground_bad(record, pairs, k, q, a, values, str(made), "invented_box", "random")
        malformed = rng.choice([str(box[:3]), str([box[0], box[1], box[2] + 1.0, box[3]]),
                                "[" + ", ".join(f"{v:.4f}" for v in box) + "]"])
        self._ground_bad(record, pairs, k, q, a, values, malformed, "malformed_box", "malformed")

    def _ground_bad(self, record, pairs, k, q, a, values, bad_box, code, name) -> None:
        bad_values = {**values, "box": bad_box}
        # The question keeps the true box when it has one; the answer carries the bad one.
        new = list(pairs)
        new[k] = (fill(q, **values), fill(a, **bad_values))
        self.add(record, "grounding", "grounded", new, code, name)

    # --- counting ---

    def counting(self, record: ImageRecord, rng: random.Random) -> None:
        counts = Counter(o.category for o in record.objects if not o.iscrowd)
        crowd = {o.category for o in record.objects if o.iscrowd}
        cats = [c for c in counts if c not in crowd and c not in ("skis", "scissors")]
        if not cats:
            return
        rng.shuffle(cats)
        pairs, bad = [], []
        for c in cats[:3]:
            n = counts[c]
            values = dict(obj=c, objs=plural(c), n=number(n))
            q = fill(self.t["count_q"], **values)
            if n == 1:
                a = fill(rng.choice(self.t["count_one"]), **values)
            else:
                a = fill(rng.choice(self.t["count_many"]), **values)
                if n >= 3:
                    a += " " + fill(self.t["count_vague"], **values)
                if n >= 3:
                    a += " " + fill(self.t["count_subset"], **values)
            pairs.append((q, a))
            k = len(pairs) - 1
            over = n + rng.choice((1, 2))
            bad.append((k, fill(self.t["count_over"], **{**values, "n": number(over)}), "over"))
            if n >= 3:
                bad.append((k, fill(self.t["count_under"], **{**values, "n": number(n - 1)}), "under"))
            if n == 1:
                bad.append((k, fill(self.t["count_vague_bad"], **values), "vague"))
        if len(pairs) == 1:
            pairs.append(("What else is in the picture?", f"The photo shows {scene(record)}."))
        self.add(record, "counting", "conversation", pairs)
        for k, text, name in bad:
            new = list(pairs)
            new[k] = (pairs[k][0], text)
            self.add(record, "counting", "conversation", new, "wrong_count", f"{name}{k}")

    # --- placement ---

    def placement(self, record: ImageRecord, rng: random.Random) -> None:
        counts = Counter(o.category for o in record.objects)
        unique = [o for o in record.objects if counts[o.category] == 1 and not o.iscrowd]
        pairs, bad = [], []
        options = [(a, b) for a in unique for b in unique if a.category < b.category]
        rng.shuffle(options)
        for a_obj, b_obj in options[:3]:
            (ax, ay), (bx, by) = (_centre(o, record) for o in (a_obj, b_obj))
            dx, dy = ax - bx, ay - by
            if abs(dx) >= abs(dy):
                relation, flipped, d = ("left", "right", dx) if dx < 0 else ("right", "left", dx)
            else:
                relation, flipped, d = ("above", "below", dy) if dy < 0 else ("below", "above", dy)
            values = dict(a=a_obj.category, b=b_obj.category)
            pairs.append((fill(self.t["place_q"], **values), fill(self.t["place"][relation], **values)))
            if abs(d) >= 0.1:
                bad.append((len(pairs) - 1, fill(self.t["place"][flipped], **values)))
        if not pairs:
            return
        if len(pairs) == 1:
            pairs.append(("What else is in the picture?", f"The photo shows {scene(record)}."))
        self.add(record, "placement", "conversation", pairs)
        for k, text in bad:
            new = list(pairs)
            new[k] = (pairs[k][0], text)
            self.add(record, "placement", "conversation", new, "wrong_position", f"flip{k}")

    # --- generic mentions in reasoning ---

    def generic(self, record: ImageRecord, truth: set[str], rng: random.Random) -> None:
        sentences = [s for s in self.t["generic"] if not _names_any(s, truth)]
        if len(sentences) < 2:
            return
        picked = rng.sample(sentences, 2)
        a = f"The photo shows {scene(record)}. " + " ".join(picked) + " Overall, the setting looks calm and well kept."
        q = rng.choice(self.t["reason_q"])
        self.add(record, "generic", "reasoning", [(q, a)])
        for j, template in enumerate(self.t["plant"]):
            obj = next((c for c in ("dog", "car", "umbrella", "bicycle", "horse", "laptop", "cat", "bus") if c not in truth), None)
            if obj is None or ("people" in template or "man" in template) and "person" in truth:
                continue
            planted = fill(template, obj=obj, a_obj=article(obj), objs=plural(obj))
            self.add(record, "generic", "reasoning", [(q, a + " " + planted)], "hallucinated_object", f"plant{j}")


_GENERIC_WORDS = {"person": ("people", "person", "tourists", "friends", "customers", "children", "workers", "students",
                             "shoppers", "kids", "drivers", "pedestrians", "travellers"),
                  "dog": ("dog",), "horse": ("horse",), "cat": ("cat",), "bus": ("bus",), "bench": ("benches",)}


def _names_any(sentence: str, truth: set[str]) -> bool:
    """Whether a generic sentence names an object the image does have (then it is not a generic-mention test)."""
    words = set(sentence.lower().replace(".", " ").replace(",", " ").split())
    return any(c in truth and words & set(ws) for c, ws in _GENERIC_WORDS.items())


def _centre(o, record: ImageRecord) -> tuple[float, float]:
    x, y, w, h = o.bbox
    return (x + w / 2) / record.width, (y + h / 2) / record.height


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0


def build_records(kind: str, coco_root: Path) -> list[dict]:
    """Good and planted records of one template set, for the images of its COCO split (deterministic)."""
    index = CocoIndex(coco_root, TEMPLATE_SETS[kind])
    builder = context_builder("negative", index, seed=0)
    writer = Writer(kind, TEMPLATE_SETS[kind])
    matcher = default_matcher()
    for image_id in index.image_ids():
        record = index.record(image_id)
        truth = ground_truth(record, matcher)
        # Two or three samples per image and family, with different template draws: over 100 good ones each.
        for round_ in range(3):
            rng = random.Random(f"{kind}:{image_id}:{round_}")
            if round_ < 2:
                absent = builder.absent_objects(record)
                writer.negative(record, absent[round_:] + absent[:round_], rng)
                writer.grounded(record, rng)
                writer.counting(record, rng)
            writer.placement(record, rng)
            writer.generic(record, truth, rng)
    seen: set[str] = set()
    for rec in writer.records:
        while rec["id"] in seen:  # a later draw repeated an earlier one's id: keep them apart
            rec["id"] += "-2"
        seen.add(rec["id"])
    return writer.records


def report(coco_root: Path, handwritten: list[Path], strict: bool) -> None:
    """Print each family's false-reject and catch rates per template set, then on hand-written files."""
    # Imported here: evaluate imports the checks, which this module's sample writing does not need.
    from datagen.quality.config import QualityConfig
    from datagen.quality.evaluate import evaluate_families
    from datagen.quality.gate import open_lookup
    from datagen.quality.io import read_samples

    lookups = {split: open_lookup(coco_root, split) for split in TEMPLATE_SETS.values()}
    config = QualityConfig(lenient_object_mentions=not strict)
    sets = {kind: build_records(kind, coco_root) for kind in TEMPLATE_SETS}
    if handwritten:
        sets["handwritten"] = [rec for path in handwritten for rec in read_samples(path)]
    print(f"{'set':12s} {'family':10s} {'good':>5s} {'false rej':>10s} {'(any check)':>12s} {'planted':>8s} {'caught':>8s}")
    for name, records in sets.items():
        for family, r in evaluate_families(records, lookups, config).items():
            fr = f"{r['good_rejected_by_family']} {100 * (r['false_reject_rate'] or 0):.1f}%"
            caught = f"{100 * r['catch_rate']:.1f}%" if r["catch_rate"] is not None else "-"
            print(f"{name:12s} {family:10s} {r['good']:5d} {fr:>10s} {r['good_rejected_any']:12d} {r['planted']:8d} {caught:>8s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco-root", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, help="Write the records as JSONL here.")
    parser.add_argument("--report", action="store_true", help="Print the checks' rates on them.")
    parser.add_argument("--handwritten", type=Path, nargs="*", default=[], help="Also report on these hand-written files.")
    parser.add_argument("--strict", action="store_true", help="Without the object check's generic-mention leniency.")
    args = parser.parse_args()
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for kind in TEMPLATE_SETS:
            records = build_records(kind, args.coco_root)
            write_text_atomic(args.out_dir / f"split_samples_{kind}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
            print(f"{kind}: {len(records)} records")
    if args.report:
        report(args.coco_root, args.handwritten, args.strict)


if __name__ == "__main__":
    main()
