"""Stage-1 alignment pairs: brief instruction + <image>, answered by one COCO caption."""
from __future__ import annotations

import random
import re
from pathlib import Path

from datagen.coco import CocoIndex
from datagen.jsonl import JsonlWriter
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
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    count = 0
    try:
        with JsonlWriter(tmp) as writer:
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
                    writer.write(sample.to_record())
                    count += 1
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed run leaves no temporary file behind
        raise
    return count
