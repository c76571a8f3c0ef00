"""Ask an exported model about an image: `python -m train.chat --model DIR --image IMG "question"`."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from datagen.escaping import terminal_text
from model.errors import TrainError
from train.arguments import ArgumentParser


def answer(model_dir: str, image_path: str, question: str, max_new_tokens: int = 64, sample: bool = False) -> str:
    """Generate an answer with transformers' LlavaForConditionalGeneration + AutoProcessor."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if not (Path(model_dir) / "config.json").is_file():
        raise TrainError(f"no exported model in '{model_dir}'", "train first (make train) or pass --model of a final/ dir")
    if not Path(image_path).is_file():
        raise TrainError(f"image '{image_path}' not found", "pass --image with an existing file")
    try:
        image = Image.open(image_path).convert("RGB")
    except OSError as exc:
        raise TrainError(f"cannot read image '{image_path}' ({exc})", "pass a JPEG/PNG file") from exc
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=sample)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    """CLI entry; errors print one line and exit 2."""
    p = ArgumentParser(prog="python -m train.chat", description="Answer a question about an image.")
    p.add_argument("question", help="the question to ask")
    p.add_argument("--model", required=True, help="exported model folder, e.g. runs/smoke/final")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (default 64)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        print(answer(args.model, args.image, args.question, args.max_new_tokens, args.sample))
        return 0
    except TrainError as exc:
        print(f"error: {terminal_text(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
