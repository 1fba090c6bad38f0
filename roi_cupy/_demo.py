"""``python -m roi_cupy demo``: crop a built-in scene with RoiAlign and RoiPool and save a PNG."""
from __future__ import annotations

import argparse
import time
from typing import Any

import numpy

import roi_cupy

# (label, x1, y1, x2, y2) in image pixels; the last box reaches past the right edge on purpose.
BOXES = (
    ("sun", 24.0, 14.0, 88.0, 78.0),
    ("house", 130.0, 86.0, 250.0, 214.0),
    ("tree", 282.0, 70.0, 350.0, 220.0),
    ("checkerboard", 20.0, 150.0, 110.0, 240.0),
    ("past the edge", 330.0, 10.0, 410.0, 60.0),
)


def scene(height: int = 256, width: int = 384) -> numpy.ndarray:
    """The demo image, drawn procedurally: float32 ``[3, H, W]`` RGB in [0, 1]."""
    y, x = numpy.mgrid[0:height, 0:width].astype(numpy.float32)
    horizon = 0.62 * height
    sky = numpy.stack([0.45 + 0.3 * y / height, 0.65 + 0.2 * y / height, 0.95 + 0 * y])
    grass = numpy.stack([0.25 + 0 * y, 0.55 - 0.2 * (y - horizon) / height, 0.2 + 0 * y])
    img = numpy.where(y < horizon, sky, grass)

    def paint(mask: numpy.ndarray, rgb: tuple[float, float, float]) -> None:
        img[:, mask] = numpy.asarray(rgb, dtype=numpy.float32)[:, None]

    paint((x - 56) ** 2 + (y - 46) ** 2 < 28**2, (1.0, 0.85, 0.2))  # sun
    paint((x > 140) & (x < 240) & (y > 140) & (y < 210), (0.8, 0.35, 0.25))  # walls
    roof = (y > 90) & (y <= 140) & (numpy.abs(x - 190) < (y - 90) * 1.1)
    paint(roof, (0.45, 0.15, 0.1))
    paint((x > 175) & (x < 200) & (y > 170) & (y < 210), (0.35, 0.2, 0.1))  # door
    paint((x > 150) & (x < 168) & (y > 152) & (y < 170), (0.7, 0.9, 1.0))  # window
    paint((x > 309) & (x < 323) & (y > 160) & (y < 218), (0.4, 0.25, 0.1))  # trunk
    paint((x - 316) ** 2 / 30**2 + (y - 120) ** 2 / 48**2 < 1, (0.1, 0.45, 0.15))  # crown
    board = (x > 24) & (x < 106) & (y > 154) & (y < 236)
    paint(board & (((x // 8) + (y // 8)) % 2 == 0), (0.05, 0.05, 0.05))
    paint(board & (((x // 8) + (y // 8)) % 2 == 1), (0.95, 0.95, 0.95))
    return numpy.ascontiguousarray(img, dtype=numpy.float32)


def _availability(name: str) -> tuple[bool, str]:
    """Whether a backend can run here, and why not."""
    if name == "cuda":
        from roi_cupy import _cuda

        return _cuda.available()
    if name == "emulator":
        from roi_cupy import _emulator

        return _emulator.available()
    return True, ""


def _pick_backend(name: str) -> tuple[str, str]:
    """The backend to run on, and why ``auto`` passed over cuda ("" when it did not)."""
    if name != "auto":
        return name, ""
    ok, why = _availability("cuda")
    return ("cuda", "") if ok else ("numpy", why)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of pixels, got {value}")
    return value


def _timed(fn: Any, sync: Any) -> tuple[Any, float, float]:
    """Result, first-call seconds (compilation included on a GPU) and best of five warm calls."""
    start = time.perf_counter()
    result = fn()
    sync()
    first = time.perf_counter() - start
    warm = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        sync()
        warm.append(time.perf_counter() - start)
    return result, first, min(warm)


# The text under the crops: what each operator does, and what the crops show because of it.
CAPTION = (
    "RoiAlign samples bilinearly: smooth, and exact to a fraction of a pixel.\n"
    "RoiPool takes the maximum of each bin on the integer pixel grid: blocky.\n"
    "It takes the maximum of each channel on its own, so a bin's R, G and B maxima may come\n"
    "from different pixels, and where two colours meet the bin shows a colour neither has:\n"
    "the sun's pink rim is the sun's red and green with the sky's blue.\n"
    "The last box reaches past the image: RoiAlign counts its samples outside as 0,\n"
    "and RoiPool gives 0 in the bins that hold no pixel."
)


def _save_png(
    path: str, image: numpy.ndarray, aligned: numpy.ndarray, pooled: numpy.ndarray
) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "PNG skipped: matplotlib is missing (pip install 'roi_cupy[demo]')"
    fig = figure(image, aligned, pooled)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def figure(image: numpy.ndarray, aligned: numpy.ndarray, pooled: numpy.ndarray) -> Any:
    """The demo's matplotlib figure: the image with its boxes, each box's crops, the caption.

    Args:
        image (ndarray[3, H, W]): the scene.
        aligned (ndarray[K, 3, PH, PW]): RoiAlign's crops, one per box of :data:`BOXES`.
        pooled (ndarray[K, 3, PH', PW']): RoiPool's crops.

    Returns:
        matplotlib.figure.Figure: needs matplotlib (the ``demo`` extra).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    k = len(BOXES)
    fig = plt.figure(figsize=(12, 6.2), layout="constrained")
    grid = fig.add_gridspec(3, k + 2, width_ratios=[3.2, 0.05] + [1] * k)
    ax = fig.add_subplot(grid[:, 0])
    ax.imshow(image.transpose(1, 2, 0))
    colors = plt.cm.tab10.colors
    for i, (label, x1, y1, x2, y2) in enumerate(BOXES):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=2, ec=colors[i]))
        # A box past the right edge gets its label inside the image.
        ax.text(min(x1 + 2, image.shape[2] - 6 * len(label)), y1 + 10, label, color=colors[i],
                fontsize=8, weight="bold",
                bbox={"facecolor": "white", "alpha": 0.75, "pad": 1, "linewidth": 0})
    ax.set_title("input [1, 3, 256, 384] with its boxes")
    ax.axis("off")
    for i, (label, *_) in enumerate(BOXES):
        for row, (crops, name) in enumerate(((aligned, "RoiAlign"), (pooled, "RoiPool"))):
            cell = fig.add_subplot(grid[row, i + 2])
            cell.imshow(numpy.clip(crops[i].transpose(1, 2, 0), 0, 1), interpolation="nearest")
            cell.set_title(f"{name}\n{label}", fontsize=8, color=colors[i])
            cell.axis("off")
    note = fig.add_subplot(grid[2, 2:])
    note.axis("off")
    note.text(0.0, 0.5, CAPTION, fontsize=9, va="center")
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m roi_cupy demo",
        description="Run RoiAlign and RoiPool on a built-in 256x384 scene with five boxes, print "
        "what ran where and how long it took, and save a PNG of the image, its boxes and the "
        "crops. Uses the GPU when CuPy sees one, NumPy otherwise.",
    )
    parser.add_argument("--out", default="roi_cupy_demo.png", help="PNG path (default: %(default)s)")
    parser.add_argument(
        "--backend",
        choices=("auto", "numpy", "emulator", "cuda"),
        default="auto",
        help="auto: cuda when a GPU is usable, else numpy; emulator runs the CUDA kernels on the "
        "CPU (needs g++) (default: %(default)s)",
    )
    parser.add_argument(
        "--size", type=_positive, default=48,
        help="RoiAlign crop size in pixels; RoiPool's is a quarter of it (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    backend, passed_over = _pick_backend(args.backend)
    ok, why = _availability(backend)
    if not ok:
        parser.error(f"the {backend} backend cannot run here: {why}")
    image = scene()
    # The babilim layers take per-image boxes [N, K, 4] and give [N, K, C, PH, PW].
    features = image[None]
    rois = numpy.array([[b[1:] for b in BOXES]], dtype=numpy.float32)
    sync = lambda: None  # noqa: E731 - host arrays need no synchronisation
    if backend == "cuda":
        import cupy

        features, rois = cupy.asarray(features), cupy.asarray(rois)
        sync = cupy.cuda.get_current_stream().synchronize
    pool_size = max(args.size // 4, 1)
    align = roi_cupy.RoiAlign((args.size, args.size), spatial_scale=1.0, sampling_ratio=2)
    pool = roi_cupy.RoiPool((pool_size, pool_size), spatial_scale=1.0)
    with roi_cupy.use_backend("numpy" if backend == "cuda" else backend):
        aligned, align_first, align_warm = _timed(lambda: align(features, rois), sync)
        pooled, pool_first, pool_warm = _timed(lambda: pool(features, rois), sync)
    if backend == "cuda":
        aligned, pooled = aligned.get(), pooled.get()

    print(f"roi_cupy {roi_cupy.__version__} demo on the {backend} backend")
    if passed_over:
        print(f"  (not on cuda: {passed_over})")
    print(f"input [1, 3, 256, 384] float32, {len(BOXES)} boxes: {', '.join(b[0] for b in BOXES)}")
    align_what = f"{args.size}x{args.size}, sampling_ratio 2, aligned"
    rows = (
        ("RoiAlign", align_what, aligned, align_first, align_warm),
        ("RoiPool", f"{pool_size}x{pool_size}", pooled, pool_first, pool_warm),
    )
    for name, what, out, first, warm in rows:
        print(
            f"  {name:<9} {what:<34} -> {list(out.shape)}  "
            f"first call {first * 1e3:8.2f} ms, warm {warm * 1e3:8.3f} ms"
        )
    print(_save_png(args.out, image, aligned[0], pooled[0]))
    return 0
