"""How the near-duplicate gate's cost per sample grows with the number of samples it keeps.

The gate (datagen.task.NearDuplicateGate over datagen.quality.minhash.NearDuplicateIndex) decides every judged
sample in the main process (the driver, on Ray) against every sample kept before it: band lookups, then a count
of the bands each earlier sample shares. This script feeds it N answer texts the way a run does (signature and
band keys computed first, as the judges do; then match, and insert when no earlier sample is close), and prints
the CPU per decision in blocks (from the previous block's end), the band-bucket entries a query touches (on
average up to that point; a second, untimed pass), and how far the process grew while the gate filled.

The texts are templated on purpose: sentences drawn from a small grammar (subjects, verbs, places, and stock
remarks), 8-14 per text, from a fixed seed. Answers of one LLM to one prompt share phrasing in this way; how
strongly real answers do decides how hot the buckets get, so read the figures as the cost on highly templated
text, not as a prediction for a given model.

Run: .venv/bin/python bench/near_dup_scale.py [--count 50000] [--seed 0] [--distinct]
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datagen.quality.config import QualityConfig  # noqa: E402
from datagen.quality.minhash import NearDuplicateIndex  # noqa: E402

SUBJECTS = ["The man", "A woman", "The dog", "A cat", "The child", "Two people", "The group", "A bus", "The train",
            "A bird", "The cyclist", "An old man", "The waiter", "A young girl", "The horse"]
VERBS = ["is standing near", "is sitting on", "is looking at", "is walking toward", "is holding", "appears to be next to",
         "seems to be enjoying", "is placed beside", "is waiting by", "is leaning against"]
PLACES = ["the table", "a bench", "the window", "a tree", "the street", "a plate of food", "the couch",
          "a large building", "the water", "a red umbrella", "the kitchen counter", "a parked car"]
REMARKS = ["It is likely that this was taken outdoors.", "The overall mood is calm.", "This suggests a busy day.",
           "The lighting indicates late afternoon.", "There is a sense of routine in the scene.",
           "Small details hint at what happened before.", "The photo captures an everyday moment.",
           "Nothing in the picture looks staged.", "The angle of the shot gives a good overview."]
BLOCKS = (1_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000)


def distinct_texts(count: int, seed: int) -> list[str]:
    """`count` texts of 100-140 words drawn from a 50,000-word vocabulary: next to no phrasing in common."""
    rng = random.Random(seed)
    vocabulary = [f"w{n}" for n in range(50_000)]
    return [" ".join(rng.choices(vocabulary, k=rng.randint(100, 140))) for _ in range(count)]


def texts(count: int, seed: int) -> list[str]:
    """`count` templated answer texts (8-14 sentences each), the same for a seed."""
    rng = random.Random(seed)

    def sentence() -> str:
        if rng.random() < 0.3:
            return rng.choice(REMARKS)
        return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)}."

    return [" ".join(sentence() for _ in range(rng.randint(8, 14))) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distinct", action="store_true",
                        help="texts with next to no phrasing in common (the index's memory per sample at its largest)")
    args = parser.parse_args()
    config = QualityConfig()
    signer = NearDuplicateIndex(config.near_duplicate_threshold, config.shingle_size, config.minhash_permutations)
    made = (distinct_texts if args.distinct else texts)(args.count, args.seed)
    signed = [(sig, signer.band_keys(sig)) for sig in map(signer.signature, made)]
    del made
    blocks = sorted({n for n in BLOCKS if n < args.count} | {args.count})

    def decide_all(count_entries: bool) -> tuple[list[dict], NearDuplicateIndex]:
        """The gate's decisions in run order: CPU per block (the timed pass), or bucket entries touched."""
        gate = NearDuplicateIndex(config.near_duplicate_threshold, config.shingle_size, config.minhash_permutations)
        rows, start, clock, touched, copies = [], 0, time.process_time(), 0, 0
        for n, (sig, bands) in enumerate(signed, start=1):
            if count_entries:
                touched += sum(len(gate.buckets.get(band, ())) for band in bands)
            if gate.match(sig, bands) is None:
                gate.insert(str(n), sig, bands)
            else:
                copies += 1
            if n in blocks:
                now = time.process_time()
                rows.append({"samples": n, "block_us_per_decision": round((now - clock) / (n - start) * 1e6, 1),
                             "entries_per_query": round(touched / n, 1), "near_copies": copies})
                start, clock = n, time.process_time()
        return rows, gate

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    timed, gate = decide_all(count_entries=False)
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    counted, _ = decide_all(count_entries=True)
    rows = [{"samples": t["samples"], "decide_us_per_sample": t["block_us_per_decision"],
             "bucket_entries_per_query": c["entries_per_query"], "near_copies": t["near_copies"]}
            for t, c in zip(timed, counted)]
    print(json.dumps({"count": args.count, "seed": args.seed, "distinct": args.distinct, "rows": rows, "kept": len(gate.keys),
                      "buckets": len(gate.buckets), "rss_growth_mb": round(rss_growth)}))


if __name__ == "__main__":
    main()
