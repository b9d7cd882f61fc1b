import base64
import io

import pytest
from PIL import Image

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
