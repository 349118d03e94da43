"""Generate images/poster.png: printed text on a plain background, for the OCR examples.

Deterministic: the same Pillow version writes the same picture. Run from the repo root:

    python tools/make_poster.py
"""

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

LINES = [
    (64, "FLORENCE CAFE", (40, 40, 40)),
    (36, "Open daily 8:00 - 18:00", (40, 40, 40)),
    (36, "Espresso 2.50", (150, 30, 30)),
    (36, "Cappuccino 3.20", (150, 30, 30)),
    (28, "Free wifi: ask at the counter", (30, 30, 120)),
]


def main() -> None:
    image = Image.new("RGB", (800, 520), (245, 238, 220))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 20, 779, 499), outline=(90, 60, 30), width=6)
    y = 60
    for size, text, color in LINES:
        font = ImageFont.load_default(size=size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        draw.text(((800 - (right - left)) / 2 - left, y - top), text, font=font, fill=color)
        y += (bottom - top) + 45
    out = Path(__file__).resolve().parents[1] / "images" / "poster.png"
    image.save(out, optimize=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
