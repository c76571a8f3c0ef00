"""Prompt files (system message, few-shot pairs, instruction lists) loaded as data."""
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

from datagen.errors import VisinstructError

SPLITS = ("conversation", "detail", "reasoning")
# Which splits show the writer the object boxes (LLaVA's conversation split used captions only).
SPLITS_WITH_BOXES = frozenset({"detail", "reasoning"})


def default_prompts_dir() -> Path:
    """`$VISINSTRUCT_PROMPTS`, else the `prompts/` folder of this checkout."""
    env = os.environ.get("VISINSTRUCT_PROMPTS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "prompts"


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise VisinstructError(f"prompt file missing: {path}", "restore it or pass --prompts-dir") from None


def files_hash(paths: list[Path], root: Path) -> str:
    """SHA-256 over (relative name, content) of each file: changes when any prompt text changes."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class PromptSet:
    """The prompt of one split: system message, few-shot pairs and (for detail) instructions."""

    split: str
    system: str
    examples: tuple[tuple[str, str], ...]
    instructions: tuple[str, ...]
    hash: str

    def messages(self, context: str) -> list[dict[str, str]]:
        """Chat messages: system, few-shot user/assistant pairs, then this image's context."""
        msgs = [{"role": "system", "content": self.system}]
        for example_context, response in self.examples:
            msgs.append({"role": "user", "content": example_context})
            msgs.append({"role": "assistant", "content": response})
        msgs.append({"role": "user", "content": context})
        return msgs


def load_instructions(prompts_dir: Path, kind: str) -> list[str]:
    """Instruction phrasings, one per non-empty line of instructions/<kind>.txt."""
    lines = [line.strip() for line in _read(Path(prompts_dir) / "instructions" / f"{kind}.txt").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise VisinstructError(f"instructions/{kind}.txt is empty", "add one instruction per line")
    return lines


def load_prompt_set(prompts_dir: Path | None, split: str) -> PromptSet:
    """Read prompts/<split>/ and hash every file that goes into the prompt."""
    root = Path(prompts_dir) if prompts_dir else default_prompts_dir()
    if split not in SPLITS:
        raise VisinstructError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")
    folder = root / split
    if not folder.is_dir():
        raise VisinstructError(f"prompt folder not found: {folder}", "pass --prompts-dir pointing at prompts/")
    used = [folder / "system.md"]
    system = _read(used[0])
    examples = []
    for context_file in sorted((folder / "examples").glob("*.context.txt")):
        response_file = context_file.with_name(context_file.name.replace(".context.txt", ".response.txt"))
        examples.append((_read(context_file), _read(response_file)))
        used += [context_file, response_file]
    instructions: tuple[str, ...] = ()
    if split == "detail":
        instructions = tuple(load_instructions(root, "detail"))
        used.append(root / "instructions" / "detail.txt")
    return PromptSet(split, system, tuple(examples), instructions, files_hash(used, root))


def pick_instruction(instructions: list[str] | tuple[str, ...], image_id: int, seed: int) -> str:
    """Deterministic per (seed, image) choice, independent of processing order."""
    return random.Random(f"{seed}:{image_id}").choice(list(instructions))
