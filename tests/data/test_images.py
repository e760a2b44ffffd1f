"""load_image: every failure is an ImageError naming the file; every pixel mode comes back as 8-bit RGB."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from blip2.data.images import ImageError, load_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _pixel(image, x=0, y=0):
    return image.getpixel((x, y))


def _close(actual, expected, tolerance=3):
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected))


def _png_header_only(width, height):
    """A PNG with a valid IHDR claiming ``width`` x ``height`` and no pixel data at all."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_rgb_png_round_trips_and_is_detached_from_the_file(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (8, 6), RED).save(path)
    image = load_image(path)
    path.unlink()  # the returned image must not need the file any more
    assert image.mode == "RGB" and image.size == (8, 6)
    assert _pixel(image, 7, 5) == RED


def test_str_path_bytes_and_pil_sources_agree(tmp_path):
    path = tmp_path / "blue.png"
    Image.new("RGB", (4, 4), BLUE).save(path)
    from_str = load_image(str(path))
    from_bytes = load_image(path.read_bytes())
    from_pil = load_image(Image.open(path))
    assert _pixel(from_str) == _pixel(from_bytes) == _pixel(from_pil) == BLUE


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match="nope.jpg: file not found") as caught:
        load_image(path)
    assert isinstance(caught.value, ValueError)
    assert caught.value.source == str(path)


def test_empty_file_and_empty_bytes(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png: empty file"):
        load_image(path)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"", name="blob")


def test_directory_is_refused(tmp_path):
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_corrupt_file_is_unreadable(tmp_path):
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageError, match="corrupt.jpg: not a readable image"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match=f"cut.{fmt.lower()}: corrupt or truncated"):
        load_image(path)


def test_bytes_errors_use_the_given_name():
    with pytest.raises(ImageError, match=r"^shard-0.tar:000012.jpg: not a readable image"):
        load_image(b"garbage bytes", name="shard-0.tar:000012.jpg")


def test_too_many_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 50), RED).save(path)

    def fail_decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail_decode)
    with pytest.raises(ImageError, match=r"big.png: 100x50 = 5000 pixels is above the limit of 4999"):
        load_image(path, max_pixels=4999)


def test_decompression_bomb_header_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(30_000, 30_000))  # 900M pixels claimed by a ~60-byte file
    with pytest.raises(ImageError, match="bomb.png: .*decompression bomb"):
        load_image(path)


def test_urls_are_refused_with_a_clear_message():
    for url in ("http://example.com/cat.jpg", "https://example.com/cat.jpg"):
        with pytest.raises(ImageError, match="remote fetching is disabled"):
            load_image(url)


def test_rgba_is_composited_on_white(tmp_path):
    path = tmp_path / "rgba.png"
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((1, 0), (255, 0, 0, 128))  # half-transparent red
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert _pixel(loaded, 0) == WHITE
    assert _close(_pixel(loaded, 1), (255, 127, 127))


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    path = tmp_path / "palette.png"
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 255] + [255, 0, 0] + [0] * (254 * 3))
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0  # palette index 0 (blue) is transparent
    image.save(path, transparency=0)
    loaded = load_image(path)
    assert _pixel(loaded, 0) == WHITE
    assert _pixel(loaded, 1) == RED


def test_plain_palette_and_pa_modes():
    plain = Image.new("P", (1, 1))
    plain.putpalette([0, 255, 0] + [0] * 765)
    assert _pixel(load_image(plain)) == (0, 255, 0)
    with_alpha = Image.new("PA", (1, 1))
    with_alpha.putpalette([0, 255, 0] + [0] * 765)
    with_alpha.putpixel((0, 0), (0, 0))  # index 0, alpha 0
    assert _pixel(load_image(with_alpha)) == WHITE


def test_greyscale_l_and_la(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (1, 1), 77).save(path)
    assert _pixel(load_image(path)) == (77, 77, 77)
    path_la = tmp_path / "grey_alpha.png"
    Image.new("LA", (1, 1), (0, 0)).save(path_la)  # black, fully transparent
    assert _pixel(load_image(path_la)) == WHITE


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    values = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(path)
    loaded = load_image(path)
    assert [_pixel(loaded, x)[0] for x in range(4)] == [0, 4, 128, 255]


def test_32_bit_integer_mode():
    wide = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert wide.mode == "I"
    assert [_pixel(load_image(wide), x)[0] for x in range(2)] == [0, 255]
    narrow = Image.fromarray(np.array([[0, 200]], dtype=np.int32))  # 8-bit values in an 'I' image
    assert _pixel(load_image(narrow), 1) == (200, 200, 200)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert _close(_pixel(loaded, 4, 4), RED, tolerance=12)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    image = Image.new("RGB", (40, 20), RED)
    image.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    assert _close(_pixel(loaded, 10, 5), RED, tolerance=12)  # the left half is now on top
    assert _close(_pixel(loaded, 10, 35), BLUE, tolerance=12)


def test_animated_gif_gives_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (4, 4), RED), Image.new("RGB", (4, 4), BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 2
    assert _pixel(load_image(path)) == RED


def test_wrong_source_type():
    with pytest.raises(TypeError, match="expects a path, bytes or a PIL image"):
        load_image(123)
