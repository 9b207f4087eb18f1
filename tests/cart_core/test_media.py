"""Decoding real files written here (PyAV mp4, Pillow PNG/JPEG, stdlib wav) and the embedding /
captioning wrappers on tiny random transformers models, checked against the models called directly."""
import hashlib

import av
import numpy as np
import pytest
import torch

from cart_core import media
from cart_core.embedders import AudioEmbedder, ImageEmbedder, l2_normalize, projection_dim
from tests.pipelines import media_fixtures as mf


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    mf.write_media_corpus(folder, n_videos=1, n_images=2, n_audio=2)
    return folder


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return mf.tiny_clip(tmp_path_factory.mktemp("clip"))


def test_modality_from_extension_and_relative_uris():
    assert media.infer_modality("s3://b/x/Clip.MP4") == "video"
    assert media.infer_modality("/a/b.jpeg") == "image"
    assert media.infer_modality("a.wav?versionId=3") == "audio"
    assert media.infer_modality("notes.txt") is None and media.infer_modality("noext") is None
    assert media.resolve_uri("a/b.png", "s3://bkt/media") == "s3://bkt/media/a/b.png"
    assert media.resolve_uri("/abs/b.png", "/base") == "/abs/b.png"
    assert media.resolve_uri("s3://x/y.png", "/base") == "s3://x/y.png"


def test_sample_indices_are_segment_centres():
    assert media.sample_indices(16, 4) == [2, 6, 10, 14]
    assert media.sample_indices(16, 1) == [8]
    assert media.sample_indices(3, 8) == [0, 1, 2]
    assert media.sample_indices(0, 4) == []


def test_video_frames_are_the_sampled_frames(files):
    data = (files / "clip0.mp4").read_bytes()
    frames = media.decode_video_frames(data, 4)
    with av.open(str(files / "clip0.mp4")) as c:
        everything = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(everything) == mf.VIDEO_FRAMES
    for got, idx in zip(frames, [2, 6, 10, 14]):
        assert got.size == (mf.SIZE, mf.SIZE)
        np.testing.assert_array_equal(np.asarray(got), everything[idx])


def test_images_decode_and_bad_files_fail_with_reasons(files):
    for name in ("image0.png", "image1.jpg"):
        img = media.decode_image((files / name).read_bytes())
        assert img.mode == "RGB" and img.size == (mf.SIZE, mf.SIZE)
    with pytest.raises(media.MediaError, match="not a decodable image"):
        media.decode_image((files / "noise.png").read_bytes())
    with pytest.raises(media.MediaError, match="not a decodable media file"):
        media.decode_video_frames((files / "truncated.mp4").read_bytes(), 4)
    with pytest.raises(media.MediaError, match="file not found"):
        media.read_bytes(str(files / "missing.mp4"))
    data = (files / "image0.png").read_bytes()
    assert media.content_hash(data) == hashlib.sha256(data).hexdigest()


def test_audio_is_resampled_downmixed_and_cropped(files):
    wave_ = media.decode_audio((files / "sound0.wav").read_bytes(), 48000)   # 0.5 s, 16 kHz, 220 Hz mono
    assert wave_.dtype == np.float32 and abs(len(wave_) - 24000) <= 64
    spectrum = np.abs(np.fft.rfft(wave_))
    assert abs(np.argmax(spectrum) * 48000 / len(wave_) - 220) < 5
    stereo = media.decode_audio((files / "sound1.wav").read_bytes(), 48000)  # both channels 0.4 amplitude
    assert 0.38 < np.abs(stereo).max() < 0.42
    assert len(media.decode_audio((files / "sound0.wav").read_bytes(), 48000, max_s=0.1)) == 4800
    with pytest.raises(media.MediaError):
        media.decode_audio((files / "image0.png").read_bytes(), 48000)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_audio_with_a_nan_or_infinite_sample_is_refused(tmp_path, bad):
    """A float WAV can store them, and every embedding of such a wave is NaN: refused at decoding,
    so extract reports the file instead of committing a NaN feature row."""
    tone = (0.4 * np.sin(2 * np.pi * 440 * np.arange(24000) / 48000)).astype(np.float32)
    assert np.allclose(media.decode_audio(mf.write_float_wav(tmp_path / "ok.wav", tone).read_bytes(), 48000), tone,
                       atol=1e-6)
    tone[1000] = bad
    with pytest.raises(media.MediaError, match="1 NaN or infinite sample"):
        media.decode_audio(mf.write_float_wav(tmp_path / "bad.wav", tone).read_bytes(), 48000)


def test_shrink_keeps_aspect_and_small_images():
    from PIL import Image

    assert media.shrink(Image.new("RGB", (1000, 500)), 100).size == (200, 100)
    small = Image.new("RGB", (50, 40))
    assert media.shrink(small, 100) is small


def test_image_embedder_matches_clip_and_mean_pools_frames(clip, files):
    from transformers import CLIPImageProcessor, CLIPModel

    emb = ImageEmbedder(clip, "cpu")
    assert emb.dim == projection_dim(clip, "vision") == mf.DIM
    frames = media.decode_video_frames((files / "clip0.mp4").read_bytes(), 4)
    image = media.decode_image((files / "image0.png").read_bytes())
    got = emb.embed_groups([frames, [image]])
    model, proc = CLIPModel.from_pretrained(clip).eval(), CLIPImageProcessor.from_pretrained(clip)
    with torch.no_grad():
        out = model.get_image_features(pixel_values=proc(images=frames + [image], return_tensors="pt")["pixel_values"])
    ref = l2_normalize(getattr(out, "pooler_output", out).numpy())
    np.testing.assert_allclose(got[0], l2_normalize(ref[:4].mean(0)), atol=1e-5)
    np.testing.assert_allclose(got[1], ref[4], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_audio_embedder_matches_clap_and_checks_rate(tmp_path, files):
    from transformers import ClapFeatureExtractor, ClapModel

    clap = mf.tiny_clap(tmp_path / "clap")
    emb = AudioEmbedder(clap, 48000, "cpu")
    waves = [media.decode_audio((files / f"sound{i}.wav").read_bytes(), 48000) for i in range(2)]
    got = emb.embed(waves)
    model, fe = ClapModel.from_pretrained(clap).eval(), ClapFeatureExtractor.from_pretrained(clap)
    with torch.no_grad():
        out = model.get_audio_features(**fe(waves, sampling_rate=48000, return_tensors="pt"))
    np.testing.assert_allclose(got, getattr(out, "pooler_output", out).numpy(), atol=1e-5)
    assert got.shape == (2, mf.DIM) and not np.allclose(got[0], got[1])
    with pytest.raises(ValueError, match="sample_rate=16000"):
        AudioEmbedder(clap, 16000, "cpu")


def test_captioner_gives_words_for_each_image(tmp_path, files):
    from cart_core.captioner import Captioner

    cap = Captioner(mf.tiny_captioner(tmp_path / "blip"), max_new_tokens=5, device="cpu")
    images = media.decode_video_frames((files / "clip0.mp4").read_bytes(), 2)
    texts = cap.caption(images)
    assert len(texts) == 2 and all(t and set(t.split()) <= set(mf.CAPTION_WORDS) for t in texts)
    assert cap.caption(images) == texts   # greedy: reruns reproduce the captions
