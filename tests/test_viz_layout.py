"""The panel's layout (`viz.side_by_side`, analyze's panel.png): titles whole, apart and inside the picture for narrow
(tall) images, images at their own size, and the layout of images as wide as their titles unchanged.

Each image is one flat colour, found again in the picture; each title is measured by its ink box (PIL's textbbox at
the place it is drawn: over its image's left edge) and compared pixel for pixel with the title drawn alone."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from spectral_jax import viz

PANEL = ["input", "segments (k=12)", "eigenvectors 2-4", "foreground", "instances (17)"]   # report.write_image's


def flat_images(sizes):
    """One image of each (H, W), each in its own palette colour (neither black nor white)."""
    colours = viz.palette(len(sizes) + 1)[1:]
    return [np.broadcast_to(c, (h, w, 3)).copy() for (h, w), c in zip(sizes, colours)]


def lefts(pic, images, top):
    """The column where each image starts in row `top` (its first row) of the picture."""
    row = pic[top]
    return [int(np.flatnonzero((row == im[0, 0]).all(-1))[0]) for im in images]


def alone(text, width, height, x):
    """`text` drawn by itself at (x, 0), black on white, in viz's font: uint8 `[height, width, 3]`."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(img).text((x, 0), text, fill=(0, 0, 0), font=viz._font())
    return np.asarray(img)


def check_panel(sizes, titles, pad=4):
    """Lay out flat images of `sizes` under `titles`; assert every property of the layout; returns the picture."""
    images = flat_images(sizes)
    pic = viz.side_by_side(images, pad=pad, titles=titles)
    font = viz._font()
    title_h = viz._text_height(font)
    top = pad + title_h
    xs = lefts(pic, images, top)
    H, W = pic.shape[:2]
    boxes = [font.getbbox(t) for t in titles]
    for im, x in zip(images, xs):                                     # each image whole, at its own size
        np.testing.assert_array_equal(pic[top:top + im.shape[0], x:x + im.shape[1]], im)
    ink = [(x + b[0], pad + b[1], x + b[2], pad + b[3]) for x, b in zip(xs, boxes)]   # where each title's ink is
    for i, (l, t, r, b) in enumerate(ink):
        assert 0 <= l and r <= W and 0 <= t and b <= top, (titles[i], ink[i], (W, top))   # inside, above the image
    for i in range(len(ink) - 1):                                     # adjacent boxes apart, a gap of white between
        assert ink[i][2] + 4 <= ink[i + 1][0], (titles[i], ink[i], titles[i + 1], ink[i + 1])
    ends = [x - 1 for x in xs[1:]] + [W]                              # up to the next title's possible overhang
    for i, (t, x, end) in enumerate(zip(titles, xs, ends)):           # the title strip is this title, whole, alone
        lo = max(x - 1, 0)                                            # an "s" reaches one pixel left of its origin
        strip = pic[pad:top, lo:end]
        np.testing.assert_array_equal(strip, alone(t, end - lo, title_h, ink[i][0] - boxes[i][0] - lo), err_msg=t)
        assert (pic[pad:top, end - 4:end] == 255).all(), t            # white before the next column / the edge
    return pic, xs


@pytest.mark.parametrize("width", [56, 14, 1])
def test_titles_over_narrow_images_are_whole_and_apart(width):
    """The panel of a tall image (448×56, as analyze gives for a 1:8 image at --size 56; a 14-pixel and a 1-pixel
    sliver): the titles are far wider than the images. The old layout drew each title at its image's left edge,
    56 + 4 pixels apart, so "segments (k=12)" ran into "eigenvectors 2-4" and that into "foreground"."""
    pic, xs = check_panel([(448, width)] * 5, PANEL)
    font = viz._font()
    for i in range(4):                                                # each column as wide as its title needs
        assert xs[i + 1] - xs[i] >= max(width, font.getbbox(PANEL[i])[2]) + 4


@pytest.mark.parametrize("sizes", [[(56, 448)] * 5, [(448, 588)] * 5, [(30, 200), (300, 90), (12, 100)]])
def test_wide_images_keep_the_old_layout(sizes):
    """Images wider than their titles: the picture is what it always was, Σ W + (n + 1)·pad wide, images pad apart."""
    titles = PANEL[:len(sizes)]
    pic, xs = check_panel(sizes, titles)
    assert pic.shape[1] == sum(w for _, w in sizes) + (len(sizes) + 1) * 4
    assert xs == [4 + sum(w + 4 for _, w in sizes[:i]) for i in range(len(sizes))]


def test_mixed_widths_and_no_pad():
    """A narrow image between wide ones, a long last title, pad 0: still whole, apart, inside the picture."""
    check_panel([(40, 200), (120, 20), (40, 30)], ["a wide one", "segments (k=12)", "instances (123)"], pad=0)


def test_untitled_panel_unchanged():
    images = flat_images([(448, 1), (448, 56)])
    pic = viz.side_by_side(images, pad=3)
    assert pic.shape == (448 + 6, 1 + 56 + 9, 3)
    assert lefts(pic, images, 3) == [3, 7]
