"""What leaves is what was checked: a released JPEG decodes to exactly the pixels the
filter saw (JPEG moves pixels, and with them a face's similarity), a PNG to the
generator's own; a lossy encoding the filter did not see is never made."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from service.batcher import DynamicBatcher
from service.encoding import ImageFormat, deliver, encode_released
from service.engine import CandidateEngine, NullObserver
from service.errors import FilterFailure, InvalidRequest
from service.generators import latents_for
from service.pipeline import GenerationPipeline, GenerationRequest
from tests.fakes import HashListFilter, ScriptedFilter

LATENT_DIM = 8
SIDE = 64


class TexturedGenerator:
    """64 px colour images with edges and noise, a pure function of the latent: JPEG
    cannot keep them exactly."""

    name = "textured"
    latent_dim = LATENT_DIM
    model_sha256 = "0" * 64

    def __init__(self) -> None:
        self.made: list[np.ndarray] = []

    def generate(self, latents: np.ndarray) -> np.ndarray:
        images = []
        for latent in latents:
            rng = np.random.default_rng(np.abs(latent * 1e6).astype(np.int64))
            image = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
            image[SIDE // 4 : SIDE // 2] = 255  # a hard edge
            images.append(image)
        self.made.extend(images)
        return np.stack(images)


def _released(
    image_format: ImageFormat, quality: int | None
) -> tuple[list[np.ndarray], ScriptedFilter, TexturedGenerator]:
    generator = TexturedGenerator()
    # The first candidate of each call is rejected: the resampled ones must hold too.
    checker = ScriptedFilter(lambda call, position: position > 0 or call > 0)

    async def run() -> list[bytes]:
        batcher = DynamicBatcher(CandidateEngine(generator, checker), max_delay=0.001)
        pipe = GenerationPipeline(batcher, LATENT_DIM, max_attempts=4, max_count=8)
        result = await pipe.generate(
            GenerationRequest(count=3, seed=5, image_format=image_format, jpeg_quality=quality)
        )
        await batcher.close()
        return [image.data for image in result.images]

    decoded = [
        np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in asyncio.run(run())
    ]
    return decoded, checker, generator


@pytest.mark.parametrize("quality", [90, 30])
def test_a_released_jpeg_decodes_to_the_pixels_the_filter_checked(quality: int) -> None:
    decoded, checker, generator = _released(ImageFormat.JPEG, quality)
    assert len(decoded) == 3 and checker.rejected
    for pixels in decoded:
        assert any(np.array_equal(pixels, seen) for seen in checker.passed)
        # ... and those are not the generator's: checking its pixels would check others.
        assert not any(np.array_equal(pixels, made) for made in generator.made)
    for rejected in checker.rejected:
        assert not any(np.array_equal(rejected, pixels) for pixels in decoded)


def test_a_released_png_holds_the_generators_pixels_as_checked() -> None:
    decoded, checker, generator = _released(ImageFormat.PNG, None)
    for pixels in decoded:
        assert any(np.array_equal(pixels, seen) for seen in checker.passed)
        assert any(np.array_equal(pixels, made) for made in generator.made)


def test_deliver_is_deterministic_and_lossless_only_for_png() -> None:
    image = TexturedGenerator().generate(np.ones((1, LATENT_DIM), np.float32))[0]
    assert deliver(image, 0) == (image, None)
    first, second = deliver(image, 75), deliver(image, 75)
    assert first[1] is not None and first[1] == second[1] and first[1][:3] == b"\xff\xd8\xff"
    assert np.array_equal(first[0], second[0]) and not np.array_equal(first[0], image)


def test_no_lossy_encoding_is_made_after_the_check() -> None:
    image = TexturedGenerator().generate(np.ones((1, LATENT_DIM), np.float32))[0]
    with pytest.raises(FilterFailure, match="do not fit a jpeg release"):
        encode_released(image, ImageFormat.JPEG, 90, None, None)
    pixels, data = deliver(image, 90)
    assert encode_released(pixels, ImageFormat.JPEG, 90, None, None, data) == data
    with pytest.raises(FilterFailure, match="do not fit a png release"):
        encode_released(pixels, ImageFormat.PNG, 90, None, None, data)


@pytest.mark.parametrize("enrolled_view", ["as generated", "as delivered"])
def test_a_jpeg_candidate_is_held_back_when_either_view_matches(enrolled_view: str) -> None:
    """Checked as decoded only, a caller choosing the quality could blur an enrolled face
    under the threshold; checked as generated only, JPEG could lift one over it."""
    generator = TexturedGenerator()
    # The JPEG request's first candidate: its latent is drawn for quality 60.
    first = generator.generate(latents_for(5, 0, 0, LATENT_DIM, delivery=60)[None])[0]
    checker = HashListFilter()
    view = first if enrolled_view == "as generated" else deliver(first, 60)[0]
    checker.enrolled.add(HashListFilter.key(view))

    async def run() -> list[int]:
        batcher = DynamicBatcher(CandidateEngine(generator, checker), max_delay=0.001)
        pipe = GenerationPipeline(batcher, LATENT_DIM, max_attempts=4, max_count=8)
        request = GenerationRequest(count=2, seed=5, image_format=ImageFormat.JPEG, jpeg_quality=60)
        result = await pipe.generate(request)
        await batcher.close()
        return [image.attempts for image in sorted(result.images, key=lambda i: i.slot)]

    assert asyncio.run(run()) == [2, 1]  # slot 0's first candidate was held back
    assert checker.batches[0] == 4  # both views of both candidates, in one batch
    assert checker.candidates[0] == [0, 1, 0, 1]  # each view says whose it is


@pytest.mark.parametrize(("image_format", "per_row"), [(ImageFormat.PNG, 1), (ImageFormat.JPEG, 2)])
def test_no_filter_call_holds_more_than_max_batch_images_whatever_one_request_asks(
    image_format: ImageFormat, per_row: int
) -> None:
    """One request of 96 went to the filter as one call of 96 images (192 for JPEG, each
    checked as generated and as decoded) with FACEGATE_MAX_BATCH=8: one caller could make
    the server hold any number of frames at once."""
    sizes: list[int] = []
    checker = ScriptedFilter(lambda call, position: True)
    check = checker.check

    def counted(images: list[np.ndarray], **kwargs: object) -> object:
        sizes.append(len(images))
        return check(images, **kwargs)  # type: ignore[arg-type]

    checker.check = counted  # type: ignore[method-assign]
    generator = TexturedGenerator()

    async def run() -> list[int]:
        batcher = DynamicBatcher(CandidateEngine(generator, checker), max_batch=8, max_delay=0.001)
        pipeline = GenerationPipeline(batcher, LATENT_DIM, max_attempts=1, max_count=96)
        result = await pipeline.generate(
            GenerationRequest(count=96, seed=5, image_format=image_format)
        )
        await batcher.close()
        return [image.slot for image in result.images]

    slots = asyncio.run(run())
    assert slots == list(range(96))  # every slot, in order, from its parts
    assert max(sizes) <= 8 and sum(sizes) == 96 * per_row


def test_a_request_whose_first_part_fails_is_not_filtered_further() -> None:
    """The request fails closed on its first failed part; its remaining parts were still
    generated and filtered, for nothing."""
    checker = ScriptedFilter(lambda call, position: (_ for _ in ()).throw(RuntimeError("boom")))

    async def run() -> None:
        batcher = DynamicBatcher(
            CandidateEngine(TexturedGenerator(), checker), max_batch=8, max_delay=0.001
        )
        pipeline = GenerationPipeline(batcher, LATENT_DIM, max_attempts=1, max_count=32)
        try:
            with pytest.raises(FilterFailure):
                await pipeline.generate(GenerationRequest(count=32, seed=5))
        finally:
            await batcher.close()

    asyncio.run(run())
    assert checker.calls == 1  # four parts of eight: only the first was filtered


class _ReleaseCounter(NullObserver):
    def __init__(self) -> None:
        self.released_attempts: list[int] = []

    def released(self, attempts: int) -> None:
        self.released_attempts.append(attempts)


def test_a_result_too_large_for_one_response_stops_early_and_counts_nothing_released() -> None:
    """A unary result over what one response may carry fails anyway: the pipeline stops
    once the images certainly exceed it, and the metrics count no image as released,
    since none leaves. The same request streamed releases and counts every image."""
    one_png = len(encode_released(TexturedGenerator().generate(np.ones((1, LATENT_DIM)))[0],
                                  ImageFormat.PNG, 90, None, None, None))  # fmt: skip
    observer = _ReleaseCounter()

    async def run(streamed: bool) -> int:
        batcher = DynamicBatcher(
            CandidateEngine(TexturedGenerator(), ScriptedFilter(lambda call, position: True)),
            max_delay=0.001,
        )
        pipeline = GenerationPipeline(
            batcher, LATENT_DIM, max_attempts=1, max_count=16, observer=observer,
            max_result_bytes=4 * one_png,
        )  # fmt: skip
        sent: list[object] = []

        async def send(image: object) -> None:
            sent.append(image)

        try:
            await pipeline.generate(
                GenerationRequest(count=16, seed=5), on_image=send if streamed else None
            )
        finally:
            await batcher.close()
        return len(sent)

    with pytest.raises(InvalidRequest, match="stream them") as refused:
        asyncio.run(run(streamed=False))
    kept = int(str(refused.value).split(" images")[0])
    assert 4 <= kept < 16  # stopped once over, not after encoding all 16
    assert observer.released_attempts == []
    assert asyncio.run(run(streamed=True)) == 16
    assert observer.released_attempts == [1] * 16
