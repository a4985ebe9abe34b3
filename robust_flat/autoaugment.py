"""AutoAugment with the CIFAR-10 policy (Cubuk et al., CVPR 2019) and Cutout, per example, on device (jittable).

The policy is the 25 sub-policies the AutoAugment search found on reduced CIFAR-10 (:data:`CIFAR10_POLICY`), with the
magnitude ranges of the PyTorch port the released code uses (a magnitude index 0..9 on a linear range per operation;
docs/paper-vs-code.md#autoaugment). Each example draws one sub-policy uniformly; each of its two operations is
applied with its probability, and the signed operations (shear, translate, rotate, colour, contrast, brightness,
sharpness) take a random sign. The paper's "AutoAugment" model trains with crop/flip, then this policy, then Cutout
of one 16 x 16 square (``data.autoaugment=True``, ``data.cutout=16``; ``experiments/configs/autoaugment.py``); the
paper finds it avoids robust overfitting.

Operations act on one float32 HWC image in [0, 1] whose values are uint8 levels (k / 255) and return such an image
(PIL, which the policy was defined with, stores uint8 after every operation; so do these). dm-pix provides the
warps of rotate and translate, solarize and the grayscale of colour and contrast; the rest are small pure-JAX
versions written here following PIL's ImageOps / ImageEnhance: invert, posterize, autocontrast, equalize,
brightness, sharpness, shear (a linear interpolation along one axis: dm-pix's bilinear warp interpolates over the
channel axis too and costs ~30x more on a CPU), and the PIL-style blend of colour, contrast and brightness
(dm-pix's adjust_contrast and adjust_saturation are TensorFlow's, a different operation).

Randomness: :func:`autoaugment` and :func:`cutout` derive example ``i``'s key as ``fold_in(key, i)`` (its position in
the batch), so the output for an example is a pure function of (key, position, image): with the trainer's step key
(itself a function of the seed and the step) a resumed run augments every example exactly as before.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

# Fill value of pixels that geometric operations and Cutout uncover: gray 128 (the port's default fill colour).
FILL = 128.0 / 255.0


def _levels(x):
    """Float image -> its uint8 levels 0..255 as float32 (exact for images of k / 255)."""
    return jnp.round(x * 255.0)


def _blend(degenerate, image, factor):
    """PIL's ``Image.blend(degenerate, image, factor)`` in uint8 levels: ``d + factor (x - d)``, truncated to an
    integer and clipped to [0, 255]; ``factor`` 1 returns ``image`` (PIL copies it)."""
    d, x = _levels(degenerate), _levels(image)
    out = jnp.clip(jnp.floor(d + jnp.float32(factor) * (x - d)), 0.0, 255.0) / 255.0
    return jnp.where(factor == 1.0, image, out)


def _gray(image):
    """PIL's "L" (ITU-R 601 luma) of an RGB image, rounded to a uint8 level, as one channel (dm-pix)."""
    return jnp.round(pix.rgb_to_grayscale(image, keep_dims=True) * 255.0) / 255.0


# ---------------------------------------------------------------------------------------------------- operations
def invert(image, _=None):
    """255 - x (PIL ``ImageOps.invert``)."""
    return 1.0 - image


def posterize(image, bits):
    """Keep the ``bits`` high bits of every uint8 level (PIL ``ImageOps.posterize``); 8 bits: identity."""
    v = _levels(image).astype(jnp.int32)
    mask = 255 - (2 ** (8 - jnp.asarray(bits, jnp.int32)) - 1)
    return (v & mask).astype(jnp.float32) / 255.0


def solarize(image, threshold):
    """Invert every level >= ``threshold`` (0..256; PIL ``ImageOps.solarize``; dm-pix's solarize); 256: identity."""
    return pix.solarize(image, jnp.asarray(threshold, jnp.float32) / 255.0)


def autocontrast(image, _=None):
    """Stretch every channel linearly so its darkest level becomes 0 and its brightest 255 (PIL
    ``ImageOps.autocontrast`` without cutoff); a constant channel is unchanged."""
    v = _levels(image).astype(jnp.int32)
    lo = v.min(axis=(0, 1), keepdims=True)
    hi = v.max(axis=(0, 1), keepdims=True)
    stretched = ((v - lo) * 255) // jnp.maximum(hi - lo, 1)
    return jnp.where(hi > lo, stretched, v).astype(jnp.float32) / 255.0


def _equalize_channel(v):
    """PIL ``ImageOps.equalize`` of one channel of uint8 levels (int32 [H, W])."""
    hist = jnp.zeros(256, jnp.int32).at[v.ravel()].add(1)
    last = hist[255 - jnp.argmax(hist[::-1] > 0)]  # the count of the brightest level present
    step = (v.size - last) // 255
    lut = (step // 2 + jnp.cumsum(hist) - hist) // jnp.maximum(step, 1)
    lut = jnp.clip(lut, 0, 255)
    return jnp.where(step > 0, lut[v], v)


def equalize(image, _=None):
    """Histogram equalization of every channel (PIL ``ImageOps.equalize``): a channel whose levels are (almost)
    all one value is unchanged."""
    v = _levels(image).astype(jnp.int32)
    out = jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)(v)
    return out.astype(jnp.float32) / 255.0


def _warp(image, matrix, offset, order: int):
    """dm-pix's pull-resampling affine warp of an HWC image, uncovered pixels :data:`FILL`, back on uint8 levels."""
    out = pix.affine_transform(image, matrix, offset=offset, order=order, mode="constant", cval=FILL)
    return jnp.round(out * 255.0) / 255.0


def _affine(name: str, arg, shape):
    """``(matrix, offset)`` of dm-pix's warp (output index (row, col, channel) -> input index) of the operation
    ``name`` (translateX, translateY or rotate) with argument ``arg``."""
    eye, zero = jnp.eye(3), jnp.zeros(3)
    arg = jnp.asarray(arg, jnp.float32)
    if name == "translateX":
        return eye, zero.at[1].set(arg)
    if name == "translateY":
        return eye, zero.at[0].set(arg)
    # rotate: counter-clockwise by arg degrees about the centre (dm-pix rotate's matrix and offset)
    c, s = jnp.cos(arg * (math.pi / 180.0)), jnp.sin(arg * (math.pi / 180.0))
    m = eye.at[0, 0].set(c).at[0, 1].set(s).at[1, 0].set(-s).at[1, 1].set(c)
    centre = (jnp.asarray(shape, jnp.float32) - 1.0) / 2.0
    return m, centre - m @ centre


_WARPED = ("translateX", "translateY", "rotate")  # the operations that are a dm-pix warp (nearest pixel)


def translate_x(image, pixels):
    """Output pixel (row, col) <- input (row, col + pixels), nearest pixel (as PIL's default; dm-pix warp)."""
    return _warp(image, *_affine("translateX", pixels, image.shape), order=0)


def translate_y(image, pixels):
    """Output pixel (row, col) <- input (row + pixels, col), nearest pixel (as PIL's default; dm-pix warp)."""
    return _warp(image, *_affine("translateY", pixels, image.shape), order=0)


def rotate(image, degrees):
    """Counter-clockwise rotation by ``degrees`` about the image centre (dm-pix ``rotate``'s matrix), nearest pixel
    (as PIL's default)."""
    return _warp(image, *_affine("rotate", degrees, image.shape), order=0)


def _shear_rows(image, shear):
    """Output pixel (row, col) <- input (row, col + shear * (row + 0.5)) (PIL's pixel-centre convention), linear
    interpolation along the row; a position outside [-0.5, W - 0.5] is :data:`FILL`. Written here: dm-pix's
    bilinear warp is ~30x slower per example on a CPU (it interpolates over the channel axis too)."""
    h, w = image.shape[:2]
    pos = jnp.arange(w, dtype=jnp.float32)[None, :] + shear * (jnp.arange(h, dtype=jnp.float32)[:, None] + 0.5)
    lo = jnp.floor(pos)
    t = (pos - lo)[..., None]
    lo = lo.astype(jnp.int32)
    take = lambda idx: jnp.take_along_axis(image, jnp.clip(idx, 0, w - 1)[..., None], axis=1)
    out = (1.0 - t) * take(lo) + t * take(lo + 1)
    inside = ((pos >= -0.5) & (pos <= w - 0.5))[..., None]
    return jnp.round(jnp.where(inside, out, FILL) * 255.0) / 255.0


def shear_x(image, shear):
    """Horizontal shear: output pixel (row, col) <- input (row, col + shear * row), linear (PIL: bicubic)."""
    return _shear_rows(image, shear)


def shear_y(image, shear):
    """Vertical shear: output pixel (row, col) <- input (row + shear * col, col), linear (PIL: bicubic)."""
    return jnp.swapaxes(_shear_rows(jnp.swapaxes(image, 0, 1), shear), 0, 1)


def color(image, factor):
    """Blend with the grayscale image (PIL ``ImageEnhance.Color``): 0 gray, 1 identity."""
    return _blend(jnp.broadcast_to(_gray(image), image.shape), image, factor)


def contrast(image, factor):
    """Blend with the constant image of the mean gray level (PIL ``ImageEnhance.Contrast``): 0 uniform gray,
    1 identity."""
    mean = jnp.floor(jnp.mean(_levels(_gray(image))) + 0.5) / 255.0
    return _blend(jnp.full_like(image, mean), image, factor)


def brightness(image, factor):
    """Blend with black (PIL ``ImageEnhance.Brightness``): 0 black, 1 identity."""
    return _blend(jnp.zeros_like(image), image, factor)


def sharpness(image, factor):
    """Blend with PIL's smoothed image (3 x 3 SMOOTH filter, weights 1 around and 5 in the centre over 13, inside;
    border pixels kept; PIL ``ImageEnhance.Sharpness``): 0 smooth, 1 identity, > 1 sharper."""
    v = _levels(image)
    h, w = image.shape[:2]
    window = sum(v[i:h - 2 + i, j:w - 2 + j] for i in range(3) for j in range(3))  # the 3 x 3 sums of the inside
    smooth = jnp.clip(jnp.floor((window + 4.0 * v[1:-1, 1:-1]) / 13.0 + 0.5), 0.0, 255.0)
    return _blend(v.at[1:-1, 1:-1].set(smooth) / 255.0, image, factor)


# -------------------------------------------------------------------------------------------------------- policy
# name -> (operation, signed, magnitude at index 9 (the ranges are linear from 0, except posterize and solarize)).
# Signed operations get a random sign; translate's magnitude is a share of the image side.
OPERATIONS = {
    "shearX": (shear_x, True, 0.3), "shearY": (shear_y, True, 0.3),
    "translateX": (translate_x, True, 150 / 331), "translateY": (translate_y, True, 150 / 331),
    "rotate": (rotate, True, 30.0),
    "color": (color, True, 0.9), "contrast": (contrast, True, 0.9), "sharpness": (sharpness, True, 0.9),
    "brightness": (brightness, True, 0.9),
    "posterize": (posterize, False, None), "solarize": (solarize, False, None),
    "autocontrast": (autocontrast, False, None), "equalize": (equalize, False, None), "invert": (invert, False, None),
}
# The CIFAR-10 policy (Cubuk et al. 2019, appendix): 25 sub-policies of two (operation, probability, magnitude
# index 0..9).
CIFAR10_POLICY: Tuple[Tuple[Tuple[str, float, int], Tuple[str, float, int]], ...] = (
    (("invert", 0.1, 7), ("contrast", 0.2, 6)),
    (("rotate", 0.7, 2), ("translateX", 0.3, 9)),
    (("sharpness", 0.8, 1), ("sharpness", 0.9, 3)),
    (("shearY", 0.5, 8), ("translateY", 0.7, 9)),
    (("autocontrast", 0.5, 8), ("equalize", 0.9, 2)),
    (("shearY", 0.2, 7), ("posterize", 0.3, 7)),
    (("color", 0.4, 3), ("brightness", 0.6, 7)),
    (("sharpness", 0.3, 9), ("brightness", 0.7, 9)),
    (("equalize", 0.6, 5), ("equalize", 0.5, 1)),
    (("contrast", 0.6, 7), ("sharpness", 0.6, 5)),
    (("color", 0.7, 7), ("translateX", 0.5, 8)),
    (("equalize", 0.3, 7), ("autocontrast", 0.4, 8)),
    (("translateY", 0.4, 3), ("sharpness", 0.2, 6)),
    (("brightness", 0.9, 6), ("color", 0.2, 8)),
    (("solarize", 0.5, 2), ("invert", 0.0, 3)),
    (("equalize", 0.2, 0), ("autocontrast", 0.6, 0)),
    (("equalize", 0.2, 8), ("equalize", 0.6, 4)),
    (("color", 0.9, 9), ("equalize", 0.6, 6)),
    (("autocontrast", 0.8, 4), ("solarize", 0.2, 8)),
    (("brightness", 0.1, 3), ("color", 0.7, 0)),
    (("solarize", 0.4, 5), ("autocontrast", 0.9, 3)),
    (("translateY", 0.9, 9), ("translateY", 0.7, 9)),
    (("autocontrast", 0.9, 2), ("solarize", 0.8, 3)),
    (("equalize", 0.8, 8), ("invert", 0.1, 3)),
    (("translateY", 0.7, 9), ("autocontrast", 0.9, 1)),
)


def magnitude(name: str, index: int) -> float:
    """The unsigned magnitude of operation ``name`` at ``index`` 0..9: linear from 0 to the maximum of
    :data:`OPERATIONS`; posterize 8 -> 4 bits (rounded), solarize threshold 256 -> 0."""
    if name == "posterize":
        return float(np.round(np.linspace(8, 4, 10))[index])
    if name == "solarize":
        return float(np.linspace(256, 0, 10)[index])
    top = OPERATIONS[name][2]
    return 0.0 if top is None else float(np.linspace(0, top, 10)[index])


def _argument(name: str, mag, sign, side: int):
    """The operation's argument: signed magnitudes times ``sign``, enhancement factors ``1 + sign * m``,
    translations in pixels."""
    fn, signed, _ = OPERATIONS[name]
    if not signed:
        return mag
    if fn in (color, contrast, sharpness, brightness):
        return 1.0 + sign * mag
    if fn in (translate_x, translate_y):
        return sign * mag * side
    return sign * mag


def _apply_one(image, key, policy):
    """One sub-policy of ``policy``, drawn uniformly, applied to one HWC ``image``."""
    k_sub, k_ops = jax.random.split(key)
    sub = jax.random.randint(k_sub, (), 0, len(policy))
    names = sorted({n for s in policy for n, _, _ in s})  # the switch's branches: the operations the policy uses
    ops = jnp.array([[names.index(n) for n, _, _ in s] for s in policy], jnp.int32)       # [S, 2]
    probs = jnp.array([[p for _, p, _ in s] for s in policy], jnp.float32)                # [S, 2]
    mags = jnp.array([[magnitude(n, i) for n, _, i in s] for s in policy], jnp.float32)   # [S, 2]
    h, w = image.shape[:2]
    for j, k in enumerate(jax.random.split(k_ops, 2)):
        k_p, k_s = jax.random.split(k)
        sign = jnp.where(jax.random.bernoulli(k_s), 1.0, -1.0)
        op, mag = ops[sub, j], mags[sub, j]
        arg = {n: _argument(n, mag, sign, w if n == "translateX" else h) for n in names}
        # one branch per operation; a warp passes the image through ...
        branches = [(lambda x, n=n: x) if n in _WARPED else (lambda x, n=n: OPERATIONS[n][0](x, arg[n]))
                    for n in names]
        out = jax.lax.switch(op, branches, image)
        # ... and all warps are one, with the matrix of the drawn operation (under vmap every branch runs for
        # every example, and the warps are the expensive ones)
        warped = [n for n in names if n in _WARPED]
        if warped:
            matrix, offset = jnp.eye(3), jnp.zeros(3)
            for n in warped:
                m_n, o_n = _affine(n, arg[n], image.shape)
                chosen = op == names.index(n)
                matrix, offset = jnp.where(chosen, m_n, matrix), jnp.where(chosen, o_n, offset)
            drawn = jnp.any(jnp.array([op == names.index(n) for n in warped]))
            out = jnp.where(drawn, _warp(image, matrix, offset, order=0), out)
        image = jnp.where(jax.random.uniform(k_p) < probs[sub, j], out, image)
    return image


def _example_keys(key, n: int):
    """Example ``i``'s key: ``fold_in(key, i)``, a function of its position only (not of the batch size)."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))


def autoaugment(key, images, policy: Sequence = CIFAR10_POLICY):
    """AutoAugment of a batch of float HWC images in [0, 1] (values on uint8 levels), one sub-policy per example,
    example ``i`` with the key ``fold_in(key, i)``. Returns images of the same shape, on uint8 levels in [0, 1]."""
    policy = tuple(tuple(tuple(op) for op in sub) for sub in policy)
    return jax.vmap(lambda x, k: _apply_one(x, k, policy))(images, _example_keys(key, images.shape[0]))


def cutout(key, images, size: int, fill: float = FILL):
    """Cutout (DeVries & Taylor 2017): one ``size`` x ``size`` square per example, centred at a uniformly random
    pixel and clipped at the border, set to ``fill``; example ``i`` uses ``fold_in(key, i)``."""
    n, h, w = images.shape[:3]

    def one(x, k):
        top, left = jax.random.randint(k, (2,), 0, jnp.array([h, w])) - size // 2
        rows = (jnp.arange(h) >= top) & (jnp.arange(h) < top + size)
        cols = (jnp.arange(w) >= left) & (jnp.arange(w) < left + size)
        return jnp.where((rows[:, None] & cols[None, :])[..., None], jnp.asarray(fill, x.dtype), x)

    return jax.vmap(one)(images, _example_keys(key, n))
