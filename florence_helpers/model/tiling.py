"""Read small text on large pages: OCR on overlapping tiles, merged back into page pixels.

Florence-2 squashes every image to its input size (768x768 for the published checkpoints),
so 8-point text on an A4 scan at 300 dpi shrinks to a few pixels and is lost. Reading the page
in overlapping tiles keeps the text near its own resolution. Each tile's regions are shifted
back to page pixels; a region cut by a tile border is dropped where the neighbouring tile
holds it whole, a line cut by a vertical border is stitched back together from both tiles,
and the regions come back in reading order.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..boundary.images import ImageSource, load_image
from ..boundary.inputs import check_number
from ..language.ocr import reading_order, to_lines
from ..language.prompts import TaskInputError
from ..language.results import OCRResult, TextResult
from ..language.tasks import Task, TaskSpec, task_spec
from .inference import run
from .loading import FlorenceModel

Tile = tuple[int, int, int, int]
"""A tile's ``x1, y1, x2, y2`` in page pixels."""


AUTO_TILE_SCALE = 1.5
"""Automatic tiles are this many times the model's input side: text shrinks by 1.5 at most."""


def tiled_ocr(
    florence: FlorenceModel,
    image: ImageSource,
    task: str | Task | TaskSpec = Task.OCR_WITH_REGION,
    *,
    tile_size: int | None = None,
    overlap: int | None = None,
    scores: bool = False,
    batch_size: int = 8,
    progress: bool | None = None,
    **run_kwargs: Any,
) -> OCRResult | TextResult:
    """OCR a large image tile by tile, so that small text keeps its resolution.

    Args:
        florence: What :func:`load_model` returned.
        image: The page (path, URL, PIL image, ...).
        task: ``"OCR_WITH_REGION"`` (regions with quads, in reading order) or ``"OCR"`` (the
            text, one line per visual line, read through ``OCR_WITH_REGION`` tiles).
        tile_size: Side of the square tiles in page pixels, at least the model's input side
            (768 for the published checkpoints) and at most the page's longer side. ``None``
            picks 1.5 times the input side, and reads a page no larger than that in one call
            (the same answer as :func:`run`).
        overlap: Pixels shared by neighbouring tiles; it must be wider than the longest word
            and taller than a line, so that a word cut by one tile is whole in the next.
            Default: a quarter of the tile.
        scores: Attach a confidence to each region (for ``"OCR"``: the geometric mean over
            the lines).
        batch_size: Tiles per ``generate`` call.
        progress: Show a progress bar over tiles; by default only when there are several
            batches.
        **run_kwargs: Passed to :func:`run` (``num_beams``, ``max_new_tokens``, ...).

    Returns:
        An :class:`OCRResult` with quads in page pixels, or a :class:`TextResult` for OCR.

    Raises:
        TaskInputError: Another task, a tile smaller than the model's input or larger than
            the page, or an overlap of half a tile or more.
        SettingError: ``tile_size``, ``overlap`` or ``batch_size`` not a whole number in range.

    Example:
        >>> page = tiled_ocr(florence, "scan_300dpi.png")  # doctest: +SKIP
        >>> print("\\n".join(to_lines(page)))  # doctest: +SKIP
    """
    spec = task_spec(task)
    if spec.task not in (Task.OCR, Task.OCR_WITH_REGION):
        raise TaskInputError(f"tiled_ocr reads text: use OCR or OCR_WITH_REGION, not {spec.name}.")
    batch_size = int(check_number(batch_size, "batch_size", minimum=1, integer=True))
    if overlap is not None:
        overlap = int(check_number(overlap, "overlap", minimum=0, integer=True))
    page = load_image(image)
    side = tile_side(florence, page.size, tile_size)
    if side is None:
        return run(florence, page, spec, scores=scores, **run_kwargs)
    share = side // 4 if overlap is None else overlap
    if share >= side / 2:
        raise TaskInputError(
            f"overlap must be under half the tile ({side // 2} pixels), got {share}."
        )
    tiles = page_tiles(page.size, side, share)
    answers = _read_tiles(florence, page, tiles, scores, batch_size, progress, run_kwargs)
    merged = reading_order(merge_tiles(answers, tiles, page.size))
    if spec.task is Task.OCR_WITH_REGION:
        return merged
    score = None
    if merged.scores is not None and len(merged):
        score = float(np.exp(np.mean(np.log(np.maximum(merged.scores, 1e-12)))))
    return TextResult(
        Task.OCR,
        page.size,
        raw=merged.raw,
        truncated=merged.truncated,
        text="\n".join(to_lines(merged)),
        score=score,
        logprob=None if score is None else math.log(max(score, 1e-12)),
    )


def _read_tiles(
    florence: FlorenceModel,
    page: Any,
    tiles: list[Tile],
    scores: bool,
    batch_size: int,
    progress: bool | None,
    run_kwargs: dict[str, Any],
) -> list[OCRResult]:
    """Each tile's OCR_WITH_REGION answer, cropping one batch at a time: the crops of a
    90-megapixel page would hold twice its pixels again."""
    answers: list[OCRResult] = []
    show = progress if progress is not None else len(tiles) > batch_size
    with tqdm(total=len(tiles), desc="tiles", unit="tile", disable=not show) as bar:
        for start in range(0, len(tiles), batch_size):
            crops = [page.crop(tile) for tile in tiles[start : start + batch_size]]
            answers += run(
                florence,
                crops,
                Task.OCR_WITH_REGION,
                scores=scores,
                batch_size=batch_size,
                progress=False,
                **run_kwargs,
            )
            bar.update(len(crops))
    return answers


def model_input_side(florence: FlorenceModel) -> int:
    """The side, in pixels, that the processor resizes every image to (768 for Florence-2)."""
    size = florence.processor.image_processor.size
    return int(min(size.get("height", 768), size.get("width", 768)))


def tile_side(
    florence: FlorenceModel, page_size: tuple[int, int], tile_size: int | None
) -> int | None:
    """The tile side to use on a page, or None when the page is read in one call."""
    longest = max(page_size)
    minimum = model_input_side(florence)
    if tile_size is None:
        auto = int(AUTO_TILE_SCALE * minimum)
        return None if longest <= auto else auto
    tile = int(check_number(tile_size, "tile_size", minimum=1, integer=True))
    if tile < minimum:
        raise TaskInputError(
            f"tile_size {tile} is below the model's input size ({minimum} pixels): smaller "
            "tiles are only enlarged again and gain nothing."
        )
    if tile > longest:
        raise TaskInputError(
            f"tile_size {tile} is larger than the image ({page_size[0]}x{page_size[1]}): "
            "read it with run(...) directly, or pass a smaller tile_size."
        )
    return tile


def page_tiles(page_size: tuple[int, int], side: int, overlap: int) -> list[Tile]:
    """Overlapping tiles that cover the page, rows top to bottom, left to right in a row.

    Along each axis the fewest tiles that overlap by at least ``overlap`` are spread evenly;
    an axis shorter than a tile gets one tile of its full length.

    Example:
        >>> page_tiles((2000, 700), 1000, 250)
        [(0, 0, 1000, 700), (500, 0, 1500, 700), (1000, 0, 2000, 700)]
    """
    columns = _spans(page_size[0], side, overlap)
    rows = _spans(page_size[1], side, overlap)
    return [(x1, y1, x2, y2) for y1, y2 in rows for x1, x2 in columns]


def _spans(length: int, side: int, overlap: int) -> list[tuple[int, int]]:
    if length <= side:
        return [(0, length)]
    count = math.ceil((length - overlap) / (side - overlap))
    starts = np.linspace(0, length - side, count).round().astype(int)
    return [(int(start), int(start) + side) for start in starts]


@dataclass(eq=False)  # compared by identity
class _Region:
    """One tile's region in page pixels, and which interior tile borders it touches."""

    quad: np.ndarray
    text: str
    score: float | None
    tile: int
    cut_left: bool
    cut_right: bool
    cut_top: bool
    cut_bottom: bool

    @functools.cached_property
    def box(self) -> tuple[float, float, float, float]:  # the quad is never changed
        (x1, y1), (x2, y2) = self.quad.min(axis=0), self.quad.max(axis=0)
        return float(x1), float(y1), float(x2), float(y2)

    @property
    def cut(self) -> bool:
        return self.cut_left or self.cut_right or self.cut_top or self.cut_bottom

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(x2 - x1, 0) * max(y2 - y1, 0)


def merge_tiles(
    results: list[OCRResult], tiles: list[Tile], page_size: tuple[int, int]
) -> OCRResult:
    """One page result from per-tile OCR results, each region kept once, in page pixels.

    A region touching a tile border inside the page is probably cut: where another tile
    holds a whole region covering at least half of it, that one is kept instead; a line cut
    by a vertical border is joined with its continuation in the next tile when their words
    meet. Of a region read whole in two tiles, the larger reading is kept.
    """
    regions = [
        _shifted(result, index, tile, page_size)
        for index, (result, tile) in enumerate(zip(results, tiles, strict=True))
    ]
    found = _stitch_lines([region for tile in regions for region in tile])
    side = max((max(x2 - x1, y2 - y1) for x1, y1, x2, y2 in tiles), default=1)
    kept = _without_duplicates(found, cell=max(side // 8, 1))
    order = {id(region): index for index, region in enumerate(found)}
    kept.sort(key=lambda r: order[id(r)])
    has_scores = all(result.scores is not None for result in results)
    quads = np.array([r.quad for r in kept], dtype=np.float32).reshape(-1, 4, 2)
    return OCRResult(
        Task.OCR_WITH_REGION,
        page_size,
        raw="\n".join(result.raw for result in results),
        truncated=any(result.truncated for result in results),
        quads=quads,
        texts=[r.text for r in kept],
        scores=np.array([r.score for r in kept], dtype=np.float32) if has_scores else None,
    )


def _shifted(result: OCRResult, index: int, tile: Tile, page_size: tuple[int, int]) -> list:
    x1, y1, x2, y2 = tile
    margin = max(2.0, 0.01 * max(x2 - x1, y2 - y1))
    regions = []
    for k, (quad, text) in enumerate(zip(result.quads, result.texts, strict=True)):
        placed = np.asarray(quad, dtype=np.float32) + np.array([x1, y1], dtype=np.float32)
        left, top = placed.min(axis=0)
        right, bottom = placed.max(axis=0)
        regions.append(
            _Region(
                quad=placed,
                text=text,
                score=None if result.scores is None else float(result.scores[k]),
                tile=index,
                cut_left=x1 > 0 and left - x1 <= margin,
                cut_right=x2 < page_size[0] and x2 - right <= margin,
                cut_top=y1 > 0 and top - y1 <= margin,
                cut_bottom=y2 < page_size[1] and y2 - bottom <= margin,
            )
        )
    return regions


def _without_duplicates(found: list[_Region], cell: int) -> list[_Region]:
    """The regions that no other repeats: whole ones first, larger first, each kept unless a
    region kept before repeats it (:func:`_duplicate`).

    Only regions whose boxes overlap can repeat each other, and never two of one tile. A grid
    of cells (``cell`` pixels square) records which tiles kept a region touching each cell;
    a region is checked against the kept regions of those tiles only, all of a tile's at once
    with numpy: a page of 10,000 regions is not 50 million comparisons, and large regions do
    not multiply the work by the cells they cover.
    """
    grid: dict[tuple[int, int], set[int]] = {}
    kept_by_tile: dict[int, _KeptRegions] = {}
    kept: list[_Region] = []
    for region in sorted(found, key=lambda r: (r.cut, -r.area)):
        x1, y1, x2, y2 = (int(v // cell) for v in region.box)
        cells = [(x, y) for x in range(x1, x2 + 1) for y in range(y1, y2 + 1)]
        tiles = {tile for c in cells for tile in grid.get(c, ())} - {region.tile}
        if any(kept_by_tile[tile].repeat(region) for tile in tiles):
            continue
        kept.append(region)
        kept_by_tile.setdefault(region.tile, _KeptRegions()).add(region)
        for c in cells:
            grid.setdefault(c, set()).add(region.tile)
    return kept


class _KeptRegions:
    """One tile's kept regions as arrays, to test a region against all of them at once."""

    def __init__(self) -> None:
        self.boxes = np.zeros((0, 4))
        self.cut = np.zeros(0, dtype=bool)
        self.areas = np.zeros(0)

    def add(self, region: _Region) -> None:
        self.boxes = np.vstack([self.boxes, region.box])
        self.cut = np.append(self.cut, region.cut)
        self.areas = np.append(self.areas, region.area)

    def repeat(self, region: _Region) -> bool:
        """Whether one of these repeats ``region``: :func:`_duplicate`, for all at once."""
        x1, y1, x2, y2 = region.box
        width = np.minimum(x2, self.boxes[:, 2]) - np.maximum(x1, self.boxes[:, 0])
        height = np.minimum(y2, self.boxes[:, 3]) - np.maximum(y1, self.boxes[:, 1])
        smaller = np.minimum(region.area, self.areas)
        overlap = np.maximum(width, 0) * np.maximum(height, 0)
        covered = (smaller > 0) & (overlap >= 0.5 * smaller)
        return bool(np.any(covered & ~(self.cut & region.cut)))


def _duplicate(region: _Region, other: _Region) -> bool:
    """Whether ``region`` repeats ``other``, read whole from another tile.

    Two cut pieces are both kept: their words did not meet, so either may hold text the
    other lacks.
    """
    if region.tile == other.tile or (region.cut and other.cut):
        return False
    return _covered(region, other)


def _covered(region: _Region, other: _Region) -> bool:
    """Whether ``other`` covers at least half of ``region`` (or the reverse)."""
    a, b = region.box, other.box
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    smaller = min(region.area, other.area)
    return smaller > 0 and max(width, 0) * max(height, 0) >= 0.5 * smaller


def _stitch_lines(regions: list[_Region]) -> list[_Region]:
    """Join a line cut at a tile's right border with its continuation in the tile beside it.

    The two pieces share the overlap; where the last words of the left piece are the first
    words of the right one, the line is joined there (again, for a line across three tiles).
    Pieces whose words do not meet stay as they are: nothing is dropped on a guess.
    """
    out, joined = list(regions), True
    while joined:  # a pass joins every chain in reading order; another finds none left
        out, joined = _stitch_pass(out)
    return out


def _stitch_pass(regions: list[_Region]) -> tuple[list[_Region], bool]:
    """One pass of :func:`_stitch_lines`: each piece cut on the right, in order, joined with
    the first piece (in order) that continues it, until none does.

    A continuation starts inside the left piece, so only pieces cut on the left whose left
    edge lies between the left piece's edges are tried (found by bisection): the work grows
    with the pieces that could continue a line, not with the page.
    """
    out = list(regions)
    starts = sorted((i for i, r in enumerate(out) if r.cut_left), key=lambda i: out[i].box[0])
    edges = [out[i].box[0] for i in starts]  # a joined piece keeps its left piece's edge
    gone: set[int] = set()
    for i in range(len(out)):
        left = out[i]
        while i not in gone and left.cut_right:
            low = bisect.bisect_right(edges, left.box[0])
            high = bisect.bisect_left(edges, left.box[2])
            matches = [
                j for j in starts[low:high] if j != i and j not in gone and _continues(left, out[j])
            ]
            if not matches:
                break
            left = _joined(left, out[min(matches)])
            gone.add(min(matches))
        out[i] = left
    return [region for k, region in enumerate(out) if k not in gone], bool(gone)


def _continues(left: _Region, right: _Region) -> bool:
    """Whether ``right`` is the rest of the line ``left``, cut at the border between them."""
    return (
        right.tile != left.tile
        and right.cut_left
        and _same_line(left, right)
        and left.box[0] < right.box[0] < left.box[2]
        and _join_words(left.text, right.text) is not None
    )


def _joined(left: _Region, right: _Region) -> _Region:
    x1, y1 = left.box[0], min(left.box[1], right.box[1])
    x2, y2 = right.box[2], max(left.box[3], right.box[3])
    scores = [s for s in (left.score, right.score) if s is not None]
    return _Region(
        quad=np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float32),
        text=_join_words(left.text, right.text) or left.text,
        score=min(scores) if len(scores) == 2 else None,
        tile=left.tile,
        cut_left=left.cut_left,
        cut_right=right.cut_right,
        cut_top=left.cut_top or right.cut_top,
        cut_bottom=left.cut_bottom or right.cut_bottom,
    )


def _same_line(a: _Region, b: _Region) -> bool:
    top = max(a.box[1], b.box[1])
    bottom = min(a.box[3], b.box[3])
    shorter = min(a.box[3] - a.box[1], b.box[3] - b.box[1])
    return shorter > 0 and bottom - top >= 0.5 * shorter


def _join_words(left: str, right: str) -> str | None:
    """``left`` and ``right`` joined where the end of one repeats the start of the other."""
    first, second = left.split(), right.split()
    for count in range(min(len(first), len(second)), 0, -1):
        if first[-count:] == second[:count]:
            return " ".join(first + second[count:])
    return None
