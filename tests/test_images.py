import base64
import io
import math

import pytest
from PIL import ExifTags, Image, ImageChops, ImageStat, JpegImagePlugin

from producer.errors import ImageError
from workers.images import load_image
from workers.settings import ImageSettings


@pytest.fixture
def settings(tmp_path):
    return ImageSettings(media_roots=[tmp_path], max_pixels=64 * 64)


def test_a_large_image_is_downscaled_to_max_pixels_not_rejected(tmp_path, settings):
    Image.new("RGB", (640, 480), "red").save(tmp_path / "big.png")
    image = load_image(str(tmp_path / "big.png"), settings)
    assert image.mode == "RGB"
    assert image.width * image.height <= 64 * 64
    assert abs(image.width / image.height - 640 / 480) < 0.1


@pytest.mark.parametrize("mode", ["L", "LA", "CMYK", "P", "RGBA", "I;16"])
def test_any_mode_becomes_rgb(tmp_path, settings, mode):
    path = tmp_path / f"im-{mode.replace(';', '')}.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    Image.new(mode, (20, 10)).save(path)
    assert load_image(str(path), settings).mode == "RGB"


@pytest.mark.parametrize(
    ("name", "content", "code"),
    [
        ("missing.jpg", None, "image_not_found"),
        ("empty.jpg", b"", "image_unreadable"),
        ("text.jpg", b"this is not an image", "image_unreadable"),
    ],
)
def test_unreadable_files_raise_clear_codes(tmp_path, settings, name, content, code):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageError) as e:
        load_image(str(tmp_path / name), settings)
    assert e.value.code == code


def test_paths_outside_the_media_roots_are_refused(tmp_path, settings):
    with pytest.raises(ImageError) as e:
        load_image(str(tmp_path / ".." / ".." / "etc" / "passwd"), settings)
    assert e.value.code == "path_not_allowed"


def test_data_uri(settings):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    assert load_image(uri, settings).size == (8, 8)
    with pytest.raises(ImageError) as e:
        load_image("data:image/png;base64,%%%", settings)
    assert e.value.code == "image_ref_invalid"


def test_loopback_urls_are_refused_unless_allowed(settings):
    with pytest.raises(ImageError) as e:
        load_image("http://127.0.0.1:9/x.jpg", settings)
    assert e.value.code == "url_not_allowed"


def _photo(size: tuple[int, int]) -> Image.Image:
    """Photo-like content (smooth structure plus fine noise), so JPEG decoding and scaling do real work."""
    coarse = [Image.effect_noise((size[0] // 16, size[1] // 16), 60).resize(size) for _ in range(3)]
    fine = Image.effect_noise(size, 12)
    return Image.merge("RGB", [ImageChops.add(band, fine, offset=-100) for band in coarse])


def _full_decode_size(width: int, height: int, max_pixels: int, grid: int = 28) -> tuple[int, int]:
    """Scaled to ``max_pixels``; from 8 grid cells a side, each side on Qwen-VL's 28-pixel patch grid,
    rounded as its processor's ``smart_resize`` rounds (down where rounding exceeds ``max_pixels``)."""
    scale = math.sqrt(max_pixels / (width * height))
    w, h = int(width * scale), int(height * scale)
    if min(w, h) < 8 * grid:
        return w, h
    near = round(width * scale / grid) * grid, round(height * scale / grid) * grid
    return near if near[0] * near[1] <= max_pixels else (w // grid * grid, h // grid * grid)


@pytest.mark.parametrize("size", [(4032, 3024), (4031, 3023), (2999, 4001), (12000, 400)])
def test_a_large_jpeg_comes_out_at_the_size_and_quality_of_a_full_decode(tmp_path, monkeypatch, size):
    settings = ImageSettings(media_roots=[tmp_path])
    path = tmp_path / "photo.jpg"
    _photo(size).save(path, quality=90)
    decoded_sizes = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, requested):
        result = original_draft(self, mode, requested)
        decoded_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    image = load_image(str(path), settings)
    expected = _full_decode_size(*size, settings.max_pixels)
    assert image.size == expected
    assert image.width * image.height <= settings.max_pixels
    assert abs(image.width / image.height / (size[0] / size[1]) - 1) < 0.03  # the grid moves it a little
    # Decoded at a reduced scale, never below the final size.
    assert len(decoded_sizes) == 1
    assert decoded_sizes[0][0] < size[0] and decoded_sizes[0][1] < size[1]
    assert decoded_sizes[0][0] >= expected[0] and decoded_sizes[0][1] >= expected[1]
    full = Image.open(path).convert("RGB").resize(expected, Image.Resampling.BICUBIC, reducing_gap=3.0)
    mse = sum(v * v for v in ImageStat.Stat(ImageChops.difference(image, full)).rms) / 3
    assert 10 * math.log10(255**2 / mse) > 38  # PSNR in dB: no visible difference, same framing


# EXIF orientation -> the transpose that undoes exif_transpose's (so the stored image turns back upright).
_STORED_AS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_rotated_large_jpegs_come_out_upright(tmp_path, orientation):
    """A portrait photo stored sideways (as phones do) with an EXIF orientation: upright, portrait, and
    at the size a full decode gives, with each corner where it belongs."""
    settings = ImageSettings(media_roots=[tmp_path])
    upright = Image.new("RGB", (2400, 3200))
    corners = {(0, 0): (255, 0, 0), (1, 0): (0, 255, 0), (0, 1): (0, 0, 255), (1, 1): (255, 255, 0)}
    for (cx, cy), colour in corners.items():
        upright.paste(colour, (cx * 1200, cy * 1600, cx * 1200 + 1200, cy * 1600 + 1600))
    stored = upright if orientation == 1 else upright.transpose(_STORED_AS[orientation])
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    path = tmp_path / f"rotated-{orientation}.jpg"
    stored.save(path, quality=90, exif=exif.tobytes())

    image = load_image(str(path), settings)
    assert image.size == _full_decode_size(2400, 3200, settings.max_pixels)
    for (cx, cy), colour in corners.items():
        x, y = int(image.width * (0.25 + 0.5 * cx)), int(image.height * (0.25 + 0.5 * cy))
        assert all(abs(a - b) < 16 for a, b in zip(image.getpixel((x, y)), colour, strict=True)), (cx, cy)
