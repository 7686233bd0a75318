"""The bundled examples (`assets/sample.*`, `assets/example2.*`) through a model, as the app runs them:
each true caption's match probability, and each of 17 one-attribute changes (colour, size, shape, event
kind, pitch or direction, and one event named twice), accepted (p > 0.5) or rejected.

The issue's target: both true captions a match, every change no match. Untimed.

    python benchmarks/bundled_examples.py assets/default runs/other_model
"""

from __future__ import annotations

import argparse

import torch

from multimodal.inference import ASSETS, Inputs, load_model, run
from multimodal.io import load_audio, load_image

# (true caption, [(words, replaced by)]): each change replaces the first occurrence of `words`
CHANGES = {
    "sample": ("a small white square and a small yellow star with a falling chirp then a rising chirp", [
        ("white square", "red square"), ("small white", "large white"), ("square", "circle"), ("star", "cross"),
        ("yellow star", "blue star"), ("falling chirp then", "rising chirp then"),
        ("then a rising chirp", "then a falling chirp"), ("rising chirp", "click train"),
        ("falling chirp", "noise burst")]),
    "example2": ("a purple cross and a large purple triangle with a high tone then a low tone", [
        ("purple cross", "green cross"), ("cross", "circle"), ("large purple", "small purple"),
        ("triangle", "square"), ("high tone then", "low tone then"), ("then a low tone", "then a high tone"),
        ("low tone", "noise burst"), ("high tone", "click train")]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="checkpoint folders or embedded models' names, as --model takes")
    args = parser.parse_args()
    for name in args.models:
        model, _ = load_model(name)  # a folder, or an embedded model's name ('default', 'local')
        accepted = total = 0
        print(name)
        for stem, (true, swaps) in CHANGES.items():
            inputs = {"image": load_image(ASSETS / f"{stem}.png"), "audio": load_audio(ASSETS / f"{stem}.wav")}

            def p(text: str) -> float:
                return float(torch.sigmoid(run(model, Inputs(text=text, **inputs), request=False).score[0]))

            print(f"  {stem}: true caption {p(true):.3f}")
            for words, other in swaps:
                changed = true.replace(words, other, 1)
                q = p(changed)
                match = q > 0.5
                accepted += match
                total += 1
                print(f"    {'ACCEPTED' if match else 'rejected'} {q:.3f}  {changed}")
        print(f"  {accepted} of {total} changes accepted")


if __name__ == "__main__":
    main()
