"""Prompt files (system message, few-shot pairs, instruction lists) loaded as data."""
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

from datagen.errors import VisinstructError
from datagen.inputs import read_text

from datagen.splits import SPLIT_SPECS, SPLITS, SPLITS_WITH_BOXES  # noqa: F401  (re-exported: older imports)


def default_prompts_dir() -> Path:
    """`$VISINSTRUCT_PROMPTS`, else the `prompts/` folder of this checkout."""
    env = os.environ.get("VISINSTRUCT_PROMPTS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "prompts"


def _read(path: Path) -> str:
    if not path.exists():
        raise VisinstructError(f"prompt file missing: {path}", "restore it or pass --prompts-dir")
    return read_text(path, "prompt file").strip()


def files_hash(paths: list[Path], root: Path) -> str:
    """SHA-256 over (relative name, content) of each file: changes when any prompt text changes.

    A file outside `root` (a shipped default filling a gap in a user's folder) is named by its path
    relative to its own prompts folder.
    """
    digest = hashlib.sha256()
    for path in sorted(paths):
        try:
            name = str(path.relative_to(root))
        except ValueError:
            name = f"default/{path.relative_to(default_prompts_dir())}"
        digest.update(name.encode())
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


def _instructions_file(prompts_dir: Path, kind: str) -> Path:
    """instructions/<kind>.txt of the folder; for a folder in LLaVA's layout without one, the shipped file."""
    own = Path(prompts_dir) / "instructions" / f"{kind}.txt"
    if own.is_file() or (Path(prompts_dir) / "instructions").is_dir() or llava_prompts_root(Path(prompts_dir)) is None:
        return own
    return default_prompts_dir() / "instructions" / f"{kind}.txt"


def load_instructions(prompts_dir: Path, kind: str) -> list[str]:
    """Instruction phrasings, one per non-empty line of instructions/<kind>.txt."""
    lines = [line.strip() for line in _read(_instructions_file(prompts_dir, kind)).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise VisinstructError(f"instructions/{kind}.txt is empty", "add one instruction per line")
    return lines


# Where LLaVA's repository keeps its prompts: a user may point at the checkout or at this folder.
LLAVA_PROMPTS_SUBDIR = Path("playground") / "data" / "prompts"


def llava_prompts_root(root: Path) -> Path | None:
    """The folder holding LLaVA-layout task folders (<task>/system_message.txt), if `root` is one or contains one."""
    for candidate in (root, root / LLAVA_PROMPTS_SUBDIR):
        for spec in SPLIT_SPECS.values():
            if spec.llava_folder and (candidate / spec.llava_folder / "system_message.txt").is_file():
                return candidate
    return None


def _our_layout(folder: Path) -> tuple[str, list[tuple[str, str]], list[Path]]:
    """system.md and examples/NN.context.txt + NN.response.txt."""
    used = [folder / "system.md"]
    system = _read(used[0])
    examples = []
    for context_file in sorted((folder / "examples").glob("*.context.txt")):
        response_file = context_file.with_name(context_file.name.replace(".context.txt", ".response.txt"))
        examples.append((_read(context_file), _read(response_file)))
        used += [context_file, response_file]
    return system, examples, used


def _llava_layout(folder: Path) -> tuple[str, list[tuple[str, str]], list[Path]]:
    """LLaVA's published layout: system_message.txt and NNN_caps.txt + NNN_conv.txt few-shot pairs."""
    used = [folder / "system_message.txt"]
    system = _read(used[0])
    examples = []
    for caps_file in sorted(folder.glob("*_caps.txt")):
        conv_file = caps_file.with_name(caps_file.name.removesuffix("_caps.txt") + "_conv.txt")
        if not conv_file.is_file():
            raise VisinstructError(f"{caps_file} has no matching {conv_file.name}", "add the response file or remove the context")
        examples.append((_read(caps_file), _read(conv_file)))
        used += [caps_file, conv_file]
    return system, examples, used


def load_prompt_set(prompts_dir: Path | None, split: str) -> PromptSet:
    """Read the prompt of a split from our layout (<split>/system.md) or LLaVA's (<task>/system_message.txt).

    In a LLaVA-layout folder, what LLaVA has no file for (the detail instructions, the negative and grounded
    splits) comes from the shipped prompts/.
    """
    root = Path(prompts_dir) if prompts_dir else default_prompts_dir()
    spec = SPLIT_SPECS.get(split)
    if spec is None:
        raise VisinstructError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")
    llava_root = llava_prompts_root(root)
    if (root / split / "system.md").is_file() or llava_root is None:
        folder = root / split
        if not folder.is_dir():
            raise VisinstructError(f"prompt folder not found: {folder}", "pass --prompts-dir pointing at prompts/")
        system, examples, used = _our_layout(folder)
        instructions_root = root
    elif spec.llava_folder and (llava_root / spec.llava_folder / "system_message.txt").is_file():
        system, examples, used = _llava_layout(llava_root / spec.llava_folder)
        instructions_root = llava_root
    else:
        # LLaVA's layout without this split (negative, grounded): the shipped prompt serves.
        system, examples, used = _our_layout(default_prompts_dir() / split)
        instructions_root = llava_root
    instructions: tuple[str, ...] = ()
    if spec.min_pairs is None:
        instructions = tuple(load_instructions(instructions_root, "detail"))
        used.append(_instructions_file(instructions_root, "detail"))
    return PromptSet(split, system, tuple(examples), instructions, files_hash(used, root))


def pick_instruction(instructions: list[str] | tuple[str, ...], image_id: int, seed: int) -> str:
    """Deterministic per (seed, image) choice, independent of processing order."""
    return random.Random(f"{seed}:{image_id}").choice(list(instructions))
