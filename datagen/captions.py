"""Stage-1 alignment pairs: brief instruction + <image>, answered by one COCO caption."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from datagen.coco import CocoIndex
from datagen.outputs import AtomicFile
from datagen.sample import sample_id
from datagen.prompts import default_prompts_dir, load_instructions
from datagen.sample import IMAGE_TOKEN, Sample


def clean_caption(text: str) -> str:
    """One line, single spaces: COCO captions carry stray newlines and double spaces."""
    return re.sub(r"\s+", " ", text).strip()


def write_caption_pairs(
    coco_root: Path,
    coco_split: str,
    out: Path,
    limit: int | None = None,
    seed: int = 0,
    all_captions: bool = False,
    prompts_dir: Path | None = None,
) -> int:
    """Write the pairs to `out` (replacing it) and return how many were written."""
    instructions = load_instructions(Path(prompts_dir) if prompts_dir else default_prompts_dir(), "brief")
    index = CocoIndex(coco_root, coco_split, with_instances=False)
    count = 0
    # Written beside `out` and renamed over it at the end (datagen.outputs): a failed run leaves an earlier
    # file as it was and no temporary file behind.
    with AtomicFile(out) as writer:
        for record in index.records(limit=limit):
            rng = random.Random(f"{seed}:{record.id}")  # per image: independent of order and limit
            captions = [c for c in (clean_caption(c) for c in record.captions) if c]
            if not captions:
                continue
            chosen = captions if all_captions else [rng.choice(captions)]
            for k, caption in enumerate(chosen):
                sid = sample_id(record.id) + (f"-{k}" if all_captions else "")
                sample = Sample(
                    id=sid,
                    image=record.file_name,
                    conversations=[
                        {"from": "human", "value": f"{IMAGE_TOKEN}\n{rng.choice(instructions)}"},
                        {"from": "gpt", "value": caption},
                    ],
                    split="captions",
                )
                writer.write(json.dumps(sample.to_record(), ensure_ascii=False) + "\n")
                count += 1
    return count
