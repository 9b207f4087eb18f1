"""Image-to-text for pseudo-queries (`cart caption`): any checkpoint transformers maps to
AutoModelForImageTextToText with a processor (BLIP, GIT, ...), by hub name or local path.

Greedy decoding, so the same frames always give the same captions (a rerun reproduces them).
"""
from __future__ import annotations


class Captioner:
    def __init__(self, name_or_path: str, max_new_tokens: int = 20, device: str | None = None,
                 batch_size: int = 8):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.processor = AutoProcessor.from_pretrained(name_or_path)
        self.model = AutoModelForImageTextToText.from_pretrained(name_or_path).to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self._torch = torch

    def caption(self, images: list) -> list[str]:
        """One caption per RGB image, whitespace-normalised ("" when the model says nothing)."""
        out: list[str] = []
        for start in range(0, len(images), self.batch_size):
            inputs = self.processor(images=images[start:start + self.batch_size], return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with self._torch.inference_mode():
                tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                             num_beams=1)
            out += [" ".join(t.split()) for t in self.processor.batch_decode(tokens, skip_special_tokens=True)]
        return out
