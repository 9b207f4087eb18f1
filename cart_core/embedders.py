"""The frozen feature extractors of `cart extract`: CLIP's image tower and CLAP's audio tower,
loaded through transformers by hub name or local path.

Only the tower a modality needs is instantiated (CLIPVisionModelWithProjection /
ClapAudioModelWithProjection read the vision / audio weights of a full CLIP / CLAP checkpoint),
which halves the memory of each Ray actor. Every embedding leaves here L2-normalised: retrieval
and the quantizers work in cosine space.
"""
from __future__ import annotations

import numpy as np

from cart_core.errors import ConfigError


def _torch_device(device: str | None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _quiet_transformers() -> None:
    """Loading one tower of a two-tower checkpoint lists every unused weight; that is expected."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _pooled(out):
    """transformers 5 returns output objects from get_*_features; older versions a tensor."""
    for name in ("image_embeds", "audio_embeds", "pooler_output"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return out


def _tower_config(name_or_path: str, tower: str):
    """The tower's config with the checkpoint's projection_dim (a full CLIP / CLAP config keeps
    projection_dim at the top level, and the tower config's own default would be wrong)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path)
    sub = getattr(config, f"{tower}_config", None)
    if sub is None:          # already a tower-only checkpoint
        return config
    sub.projection_dim = config.projection_dim
    return sub


def projection_dim(name_or_path: str, tower: str) -> int:
    """Embedding size of a CLIP (tower="vision") or CLAP (tower="audio") checkpoint, from its
    config only: lets the driver check dims before any actor loads weights."""
    return int(_tower_config(name_or_path, tower).projection_dim)


def audio_sampling_rate(name_or_path: str) -> int:
    """The rate a CLAP checkpoint's feature extractor expects, from its preprocessor config only."""
    from transformers import AutoFeatureExtractor

    _quiet_transformers()
    return int(AutoFeatureExtractor.from_pretrained(name_or_path).sampling_rate)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class ImageEmbedder:
    """CLIP image features for images, and for videos the mean of their frames' normalised
    features, normalised again (mean pooling as in CLIP4Clip)."""

    def __init__(self, name_or_path: str, device: str | None = None, batch_size: int = 64):
        import torch
        from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

        _quiet_transformers()
        self.device = _torch_device(device)
        self.batch_size = batch_size
        self.processor = AutoImageProcessor.from_pretrained(name_or_path)
        config = _tower_config(name_or_path, "vision")
        self.model = CLIPVisionModelWithProjection.from_pretrained(name_or_path, config=config)
        self.model.to(self.device).eval()
        self.dim = int(config.projection_dim)
        self._torch = torch

    def embed_images(self, images: list) -> np.ndarray:
        """(len(images), dim) float32, each row L2-normalised."""
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=images[start:start + self.batch_size], return_tensors="pt")
            with self._torch.inference_mode():
                feats = _pooled(self.model(pixel_values=pixels["pixel_values"].to(self.device)))
            out.append(feats.float().cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalize(np.concatenate(out))

    def embed_groups(self, groups: list[list]) -> np.ndarray:
        """One embedding per group of images (an image is a group of one, a video its frames):
        all frames of a batch go through the model together."""
        flat = [img for g in groups for img in g]
        feats = self.embed_images(flat)
        out, start = [], 0
        for g in groups:
            out.append(feats[start:start + len(g)].mean(axis=0))
            start += len(g)
        return l2_normalize(np.stack(out)) if out else np.zeros((0, self.dim), np.float32)


class AudioEmbedder:
    """CLAP audio features. Waveforms must be mono at the feature extractor's sampling rate and
    no longer than its window (decode_audio crops them), so CLAP's random crop never applies and
    the same file always gives the same embedding."""

    def __init__(self, name_or_path: str, sample_rate: int, device: str | None = None, batch_size: int = 16):
        import torch
        from transformers import AutoFeatureExtractor, ClapAudioModelWithProjection

        _quiet_transformers()
        self.device = _torch_device(device)
        self.batch_size = batch_size
        self.features = AutoFeatureExtractor.from_pretrained(name_or_path)
        if int(self.features.sampling_rate) != int(sample_rate):
            raise ConfigError(f"extract.sample_rate={sample_rate} but the CLAP feature extractor of "
                             f"{name_or_path} expects {self.features.sampling_rate} Hz; set extract.sample_rate "
                             f"to {self.features.sampling_rate}")
        config = _tower_config(name_or_path, "audio")
        self.truncation = "fusion" if getattr(config, "enable_fusion", False) else "rand_trunc"
        self.model = ClapAudioModelWithProjection.from_pretrained(name_or_path, config=config)
        self.model.to(self.device).eval()
        self.dim = int(config.projection_dim)
        self.sample_rate = int(sample_rate)
        self.max_samples = int(self.features.nb_max_samples)
        self._torch = torch

    def embed(self, waves: list[np.ndarray]) -> np.ndarray:
        """(len(waves), dim) float32, each row L2-normalised."""
        out = []
        for start in range(0, len(waves), self.batch_size):
            chunk = [np.asarray(w[:self.max_samples], np.float32) for w in waves[start:start + self.batch_size]]
            inputs = self.features(chunk, sampling_rate=self.sample_rate, truncation=self.truncation,
                                   return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with self._torch.inference_mode():
                feats = _pooled(self.model(**inputs))
            out.append(feats.float().cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalize(np.concatenate(out))
