"""Real small media and tiny random models for the extract / caption / end-to-end tests.

Media are written with the real encoders (PyAV's libx264, Pillow, the stdlib `wave` module) and
the models are genuine transformers CLIP / CLAP / BLIP classes with tiny random weights, saved with
save_pretrained: the pipelines run exactly the code they run on real checkpoints, offline.
"""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cart_core.config import CartConfig

DIM = 32                     # projection dim of the tiny CLIP and CLAP (equal, so they share a store)
VIDEO_FRAMES = 16
SIZE = 64
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 20), (200, 40, 200), (20, 210, 210)]


# ---- media -----------------------------------------------------------------------------------
def _pattern(seed: int, t: float = 0.0, size: int = SIZE) -> np.ndarray:
    """A solid colour with a moving bright square: frames of one video differ, videos differ."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = COLOURS[seed % len(COLOURS)]
    x = int(t * (size - 16))
    y = (seed * 11) % (size - 16)
    img[y:y + 16, x:x + 16] = 255 - np.array(COLOURS[(seed + 3) % len(COLOURS)], np.uint8)
    return img


def write_video(path: Path, seed: int, frames: int = VIDEO_FRAMES, size: int = SIZE) -> Path:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(_pattern(seed, i / max(1, frames - 1), size), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_image(path: Path, seed: int, size: int = SIZE) -> Path:
    from PIL import Image

    Image.fromarray(_pattern(seed + 100, (seed % 4) / 4, size)).save(path)
    return path


def write_wav(path: Path, seed: int, rate: int = 16000, seconds: float = 0.5, channels: int = 1) -> Path:
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.4 * np.sin(2 * np.pi * (220 + 110 * seed) * t)
    pcm = (np.repeat(tone[:, None], channels, axis=1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def write_float_wav(path: Path, samples: np.ndarray, rate: int = 48000) -> Path:
    """A mono IEEE-float WAV (format 3): unlike 16-bit PCM it can hold NaN and infinite samples."""
    import struct

    data = np.asarray(samples, "<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def write_bad_files(folder: Path) -> list[tuple[str, str, str | None]]:
    """(item_id, file name, modality) of files extract must reject: truncated mp4, random bytes
    named .png, a path that does not exist, an unsupported extension."""
    good = write_video(folder / "_whole.mp4", seed=9)
    data = good.read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    good.unlink()
    (folder / "noise.png").write_bytes(np.random.default_rng(0).bytes(2048))
    (folder / "notes.txt").write_text("not media")
    return [("bad-truncated", "truncated.mp4", None), ("bad-noise", "noise.png", "image"),
            ("bad-missing", "missing.mp4", None), ("bad-unsupported", "notes.txt", None)]


def write_media_corpus(folder: str | Path, n_videos: int = 2, n_images: int = 2, n_audio: int = 1,
                       bad: bool = True, relative: bool = False) -> Path:
    """Media files plus `media.parquet` (item_id, uri, modality) describing them; returns the
    table's path. item_ids: vid-N / img-N / aud-N for good files, bad-* for the ones that must fail.
    `relative` writes URIs relative to the table (so the folder can be uploaded anywhere)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str | None]] = []
    for i in range(n_videos):
        rows.append((f"vid-{i}", write_video(folder / f"clip{i}.mp4", seed=i).name, None))
    for i in range(n_images):
        ext = "png" if i % 2 == 0 else "jpg"
        rows.append((f"img-{i}", write_image(folder / f"image{i}.{ext}", seed=i).name, "image" if i % 3 == 0 else None))
    for i in range(n_audio):
        rows.append((f"aud-{i}", write_wav(folder / f"sound{i}.wav", seed=i, channels=1 + i % 2).name, None))
    if bad:
        rows += write_bad_files(folder)
    uri = (lambda name: name) if relative else (lambda name: str((folder / name).resolve()))
    table = pa.table({"item_id": [r[0] for r in rows], "uri": [uri(r[1]) for r in rows],
                      "modality": pa.array([r[2] for r in rows], pa.string())})
    pq.write_table(table, folder / "media.parquet")
    return folder / "media.parquet"


def upload_folder(folder: str | Path, url: str) -> None:
    """Copy a local folder's files to s3://bucket/prefix (the S3 fixture's endpoint comes from env)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    for f in sorted(Path(folder).iterdir()):
        if f.is_file():
            fs.put_file(str(f), f"{root.rstrip('/')}/{f.name}")


# ---- tiny models ---------------------------------------------------------------------------------
def _tiny_text(vocab_size: int, **extra) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=vocab_size, **extra)


def tiny_clip(folder: str | Path, dim: int = DIM, image_size: int = 32) -> str:
    """A random CLIP (vision 32x32, patch 8) with its image processor, saved to `folder`."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(text_config=_tiny_text(64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=image_size, patch_size=8),
                        projection_dim=dim)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return str(folder)


def tiny_clap(folder: str | Path, dim: int = DIM) -> str:
    """A random CLAP (two-stage HTSAT, hidden 32) with its 48 kHz feature extractor."""
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    torch.manual_seed(0)
    config = ClapConfig(text_config=_tiny_text(64, max_position_embeddings=40),
                        audio_config=dict(hidden_size=32, depths=[1, 1], num_attention_heads=[1, 2],
                                          patch_embeds_hidden_size=16, window_size=8, projection_hidden_size=32,
                                          enable_fusion=False),
                        projection_dim=dim)
    ClapModel(config).save_pretrained(folder)
    ClapFeatureExtractor(truncation="rand_trunc").save_pretrained(folder)
    return str(folder)


CAPTION_WORDS = "a an the red green blue yellow square video of with on in photo picture image small big".split()


def tiny_captioner(folder: str | Path) -> str:
    """A random BLIP captioner (BlipForConditionalGeneration + BlipProcessor with a 24-word BERT
    vocabulary). Special tokens are pushed out of the output head so every caption has words."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, \
        BlipProcessor

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(specials + CAPTION_WORDS)}, bos_token="[DEC]")
    ids = dict(bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
               eos_token_id=tok.sep_token_id)
    torch.manual_seed(0)
    config = BlipConfig(text_config=_tiny_text(len(tok), encoder_hidden_size=32, max_position_embeddings=32, **ids),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8),
                        projection_dim=32)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():
        model.text_decoder.cls.predictions.decoder.bias[: len(specials)] = -1e4
    model.save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok) \
        .save_pretrained(folder)
    return str(folder)


def tiny_config(clip: str | None = None, clap: str | None = None, captioner: str | None = None,
                frames: int = 4) -> CartConfig:
    """Config for the tiny models on a 2-core box: half-CPU actors (Ray Data stalls when the
    actors hold every CPU), small batches, few frames."""
    cfg = CartConfig()
    ex, cap = cfg.extract, cfg.caption
    ex.image_model, ex.audio_model = clip or ex.image_model, clap or ex.audio_model
    ex.frames, ex.batch_size, ex.actors, ex.num_cpus, ex.max_audio_s = frames, 8, 1, 0.5, 2.0
    cap.model = captioner or cap.model
    cap.frames, cap.batch_size, cap.actors, cap.num_cpus, cap.max_new_tokens = 2, 8, 1, 0.5, 6
    return cfg
