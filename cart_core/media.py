"""Reading and decoding media for `cart extract` / `cart caption`: bytes through fsspec (local
paths and s3:// alike), images with Pillow, video frames and audio with PyAV (one FFmpeg for both).

Everything here works on bytes already in memory: the content hash needs every byte anyway, and
decoding from memory keeps object stores and local files on one code path.
"""
from __future__ import annotations

import hashlib
import io
import posixpath
from pathlib import PurePosixPath

import numpy as np

from cart_core.errors import BadInput

MODALITIES = ("image", "video", "audio")
EXTENSIONS = {
    "image": {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"},
    "video": {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg"},
    "audio": {".wav", ".flac", ".mp3", ".ogg", ".m4a", ".aac", ".opus"},
}


class MediaError(BadInput):
    """A file that cannot be used; the message is the `reason` written to the errors table."""


def infer_modality(uri: str) -> str | None:
    """Modality from the file extension (None when the extension is not one we decode)."""
    suffix = PurePosixPath(uri.split("?", 1)[0]).suffix.lower()
    for modality, exts in EXTENSIONS.items():
        if suffix in exts:
            return modality
    return None


def resolve_uri(uri: str, base: str | None) -> str:
    """Relative URIs in a media table are relative to the table's own folder (local or remote)."""
    if "://" in uri or uri.startswith("/") or not base:
        return uri
    return posixpath.join(base, uri)


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """The whole file. A missing or forbidden file raises MediaError (that file is bad); any
    other failure (no credentials, network down) propagates: it is not the file's fault, and
    recording every file as bad would hide it."""
    import fsspec

    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError:
        raise MediaError("file not found") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise MediaError(f"cannot read: {type(exc).__name__}: {exc}") from None


def content_hash(data: bytes) -> str:
    """sha256 of the file bytes: an unchanged file is skipped on the next extract."""
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes):
    """An RGB PIL image (fully loaded, so truncated files fail here and not later)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError:
        raise MediaError("not a decodable image (unknown or corrupt format)") from None
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"not a decodable image: {exc}") from None
    return img.convert("RGB")


def shrink(img, max_short_side: int | None):
    """Downscale so the shorter side is at most `max_short_side`: the model resizes to about
    224 px anyway, and full-size frames would make a batch of videos cost gigabytes."""
    if not max_short_side or min(img.size) <= max_short_side:
        return img
    from PIL import Image

    scale = max_short_side / min(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)


def sample_indices(n_total: int, n: int) -> list[int]:
    """`n` frame indices spread uniformly over `n_total` frames: the centre of each of n equal
    segments (one frame -> the middle frame); fewer frames than asked -> every frame once."""
    if n_total <= 0 or n <= 0:
        return []
    return sorted({min(n_total - 1, int((i + 0.5) * n_total / n)) for i in range(n)})


def _ffmpeg_reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def _av_open(data: bytes):
    import av

    try:
        return av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise MediaError(f"not a decodable media file: {_ffmpeg_reason(exc)}") from None


def decode_video_frames(data: bytes, n: int) -> list:
    """`n` RGB PIL frames sampled uniformly (`sample_indices`) from the first video stream.

    The frame count comes from the container header or, when it is not there, from counting
    packets; only the chosen frames are converted to images."""
    import av

    container = _av_open(data)
    try:
        if not container.streams.video:
            raise MediaError("no video stream")
        stream = container.streams.video[0]
        total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        if total <= 0:
            raise MediaError("video has no frames")
        if not stream.frames:
            container.seek(0)
        wanted = sample_indices(total, n)
        frames, index = [], 0
        try:
            for frame in container.decode(stream):
                if index in wanted:
                    frames.append(frame.to_image().convert("RGB"))
                    if len(frames) == len(wanted):
                        break
                index += 1
        except av.FFmpegError as exc:
            raise MediaError(f"video decoding failed at frame {index}: {_ffmpeg_reason(exc)}") from None
        if len(frames) < len(wanted):
            raise MediaError(f"video ended after {index} of {total} frames")
        return frames
    finally:
        container.close()


def decode_audio(data: bytes, sample_rate: int, max_s: float | None = None) -> np.ndarray:
    """Mono float32 waveform at `sample_rate`, at most `max_s` seconds from the start.

    FFmpeg's resampler (libswresample, band-limited) changes the rate; channels are averaged
    (FFmpeg's own down-mix would scale a stereo file by 1/sqrt(2) per channel, not 1/2)."""
    import av

    container = _av_open(data)
    try:
        if not container.streams.audio:
            raise MediaError("no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp", rate=sample_rate)
        limit = int(max_s * sample_rate) if max_s else None
        chunks, have = [], 0
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().mean(axis=0))
                    have += chunks[-1].size
                if limit is not None and have >= limit:
                    break
            else:
                chunks += [out.to_ndarray().mean(axis=0) for out in resampler.resample(None)]
        except av.FFmpegError as exc:
            raise MediaError(f"audio decoding failed: {_ffmpeg_reason(exc)}") from None
    finally:
        container.close()
    wave = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if wave.size == 0:
        raise MediaError("audio has no samples")
    wave = wave[:limit] if limit is not None else wave
    bad = int(np.count_nonzero(~np.isfinite(wave)))
    if bad:  # a float WAV can store them; every embedding of it would be NaN
        raise MediaError(f"audio holds {bad} NaN or infinite sample(s)")
    return wave
