"""
data.py -- images for pre-training the tuning-encoder (Sec. 5.1), and the two views per image.

Sources (any combination is their union):
    --data DIR          ImageNet-style: class sub-folders (or one flat folder) of images
    --openimages DIR    OpenImages: images named <ImageID>.jpg plus the standard box CSV
                        (ImageID, XMin, XMax, YMin, YMax in [0, 1]); we crop the *largest* box
                        of each image "to avoid training on multiple subjects" (Sec. 5.1)
    --data synthetic    a seeded procedural set (shapes, colours, textures); nothing to download

Every image gives two views: the VAE view (preset resolution, in [-1, 1]) and the CLIP view
(224 px, CLIP mean/std), with light augmentation (random crop, horizontal flip).
Bad files never stop a run: an unreadable image is counted and replaced by the next good one.

    python data.py --example examples/concept.png     # write one synthetic concept image
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import random
import re
import sys
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFile, ImageOps
from torch.utils.data import Dataset, DistributedSampler, Sampler

from cmdline import atomic_write
from model import CLIP_MEAN, CLIP_STD, PLACEHOLDER

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SYNTHETIC = "synthetic"
SYNTHETIC_SIZE = 10_000  # images in the procedural set (they are drawn on the fly)

# Our own prompt templates around the placeholder (pre-training and tuning draw from them).
PROMPT_TEMPLATES = [
    "a photo of {}",
    "a rendering of {}",
    "a cropped photo of {}",
    "the photo of {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of {}",
    "a bright photo of {}",
    "a good photo of {}",
    "a photo of one {}",
    "a rendition of {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the large {}",
    "a blurry photo of {}",
    "an image of {}",
    "a picture of {}",
]


def make_prompts(n: int, rng: random.Random, placeholder: str = PLACEHOLDER) -> list[str]:
    return [rng.choice(PROMPT_TEMPLATES).format(placeholder) for _ in range(n)]


# ----------------------------------------------------------------------------------------
# Reading images robustly


class BadImage(Exception):
    """An image file that cannot be used (missing, empty, corrupt, truncated, not an image)."""


def load_image(path: str, box=None) -> Image.Image:
    """Open any common image as RGB: EXIF rotation applied; grey/RGBA/CMYK/palette -> RGB
    (transparency composited on white); optional crop box (xmin, xmax, ymin, ymax) in [0, 1].
    Raises BadImage with a one-line reason."""
    if os.path.isdir(path):
        raise BadImage(f"{path} is a directory, not an image file")
    if not os.path.isfile(path):
        raise BadImage(f"no such file: {path}")
    if os.path.getsize(path) == 0:
        raise BadImage(f"empty file: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's DecompressionBomb / palette warnings
            with Image.open(path) as im:
                im.load()  # decode now: truncated or corrupt data fails here
                im = ImageOps.exif_transpose(im)
                im = _to_8_bit(im)
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    im = im.convert("RGBA")
                    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(bg, im)
                im = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImage(f"cannot read image {path}: {e.__class__.__name__}: {e}".splitlines()[0]) from None
    if box is not None:
        x0, x1, y0, y1 = box
        w, h = im.size
        left, top = int(x0 * w), int(y0 * h)
        crop = (left, top, max(left + 1, math.ceil(x1 * w)), max(top + 1, math.ceil(y1 * h)))  # >= 1 px
        im = im.crop(crop)
    return im


def _to_8_bit(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit single-channel images (modes I;16*, I, F) as 8-bit grey ("L").

    Pillow's convert("RGB") clips these at 255 instead of scaling them, so a 16-bit grey PNG
    would become a white picture. Integer modes are scaled from their full range (0..65535 for
    16-bit data, also when Pillow reports it as "I"); float images are taken to be in [0, 1]
    if they fit there, else in [0, 255].
    """
    if not (im.mode.startswith("I") or im.mode == "F"):
        return im
    a = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        scale = 255.0 if a.max(initial=0) <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0 if (im.mode.startswith("I;16") or a.max(initial=0) > 255) else 1.0
    return Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8))  # mode "L"


# ----------------------------------------------------------------------------------------
# Sources


def list_image_folder(root: str) -> list[tuple[str, None]]:
    """Every image under root (class sub-folders or flat), sorted for determinism."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data: no such folder: {root}")
    items = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if os.path.splitext(f)[1].lower() in IMAGE_EXTS:
                items.append((os.path.join(dirpath, f), None))
    return sorted(items)


def largest_boxes(csv_path: str) -> dict[str, tuple[float, float, float, float]]:
    """ImageID -> (XMin, XMax, YMin, YMax) of its largest box (Sec. 5.1)."""
    best: dict[str, tuple[float, tuple]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            x0, x1, y0, y1 = (float(row[k]) for k in ("XMin", "XMax", "YMin", "YMax"))
            area = max(0.0, x1 - x0) * max(0.0, y1 - y0)
            if area > 0 and (row["ImageID"] not in best or area > best[row["ImageID"]][0]):
                best[row["ImageID"]] = (area, (x0, x1, y0, y1))
    return {k: box for k, (_, box) in best.items()}


def class_nouns(folder: str, files: list[str]) -> dict[str, str]:
    """file -> class noun: DIR/classes.csv (file,noun) if present, else the stem's leading word
    (dog_02.jpg -> dog; no leading letters -> "object"). evaluate.py scores CLIP-T against it;
    pretrain.py's validation splits its gap by it."""
    table = {}
    path = os.path.join(folder, "classes.csv")
    if os.path.isfile(path):
        with open(path, newline="") as f:
            for row in csv.reader(f):
                if len(row) >= 2 and row[0].strip() and row[0].strip().lower() != "file":
                    table[row[0].strip()] = row[1].strip()
    nouns = {}
    for f in files:
        m = re.match(r"[A-Za-z]+", os.path.splitext(f)[0])
        nouns[f] = table.get(f) or (m.group(0).lower() if m else "object")
    return nouns


def list_openimages(root: str) -> list[tuple[str, tuple]]:
    """(image path, largest box) for every image of root that has a box in root's CSV files."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--openimages: no such folder: {root}")
    boxes: dict[str, tuple] = {}
    for f in sorted(os.listdir(root)):
        if f.lower().endswith(".csv"):
            with open(os.path.join(root, f), newline="") as fh:
                header = next(csv.reader(fh), [])
            if {"ImageID", "XMin", "XMax", "YMin", "YMax"} <= set(header):
                boxes.update(largest_boxes(os.path.join(root, f)))
    if not boxes:
        raise FileNotFoundError(f"--openimages: no box CSV (ImageID, XMin, XMax, YMin, YMax) in {root}")
    items = []
    for path, _ in list_image_folder(root):
        image_id = os.path.splitext(os.path.basename(path))[0]
        if image_id in boxes:
            items.append((path, boxes[image_id]))
    return items


def synthetic_image(index: int, size: int = 256, seed: int = 0) -> Image.Image:
    """A procedural 'concept': one textured shape on a textured background, fixed by (seed, index)."""
    rng = random.Random(seed * 1_000_003 + index)  # a prime stride: (seed, index) pairs never collide
    col = lambda: tuple(rng.randrange(256) for _ in range(3))  # noqa: E731
    bg1, bg2, fg1, fg2 = col(), col(), col(), col()
    im = Image.new("RGB", (size, size), bg1)
    d = ImageDraw.Draw(im)
    # Background texture: stripes, checks or dots.
    kind, step = rng.randrange(3), rng.randrange(8, 32)
    for i in range(0, size, step):
        for j in range(0, size, step):
            if kind == 0 and (i // step) % 2 == 0:
                d.rectangle([i, 0, i + step // 2, size], fill=bg2)
                break
            if kind == 1 and ((i // step) + (j // step)) % 2 == 0:
                d.rectangle([i, j, i + step - 1, j + step - 1], fill=bg2)
            if kind == 2:
                d.ellipse([i, j, i + step // 3, j + step // 3], fill=bg2)
    # The object: a shape picked by index (so the set has "classes"), with a texture of its own.
    r = rng.uniform(0.2, 0.38) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    shape = index % 5
    mask = Image.new("L", (size, size), 0)
    m = ImageDraw.Draw(mask)
    if shape == 0:
        m.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == 1:
        m.rectangle([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == 2:
        m.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=255)
    elif shape == 3:
        pts = [(cx + (r if k % 2 == 0 else r / 2.5) * math.cos(math.pi * k / 5 - math.pi / 2),
                cy + (r if k % 2 == 0 else r / 2.5) * math.sin(math.pi * k / 5 - math.pi / 2)) for k in range(10)]
        m.polygon(pts, fill=255)
    else:
        m.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        m.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], fill=0)
    obj = Image.new("RGB", (size, size), fg1)
    o = ImageDraw.Draw(obj)
    ostep = rng.randrange(4, 16)
    for k in range(-size, size, 2 * ostep):  # diagonal stripes on the object
        o.line([(k, 0), (k + size, size)], fill=fg2, width=ostep)
    im.paste(obj, (0, 0), mask)
    return im


# ----------------------------------------------------------------------------------------
# Views


def _to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [0, 1]."""
    t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.size[1], im.size[0], 3)
    return t.permute(2, 0, 1).float() / 255.0


def make_views(im: Image.Image, resolution: int, clip_size: int = 224, rng: random.Random | None = None):
    """(VAE view (3, R, R) in [-1, 1], CLIP view (3, 224, 224) normalised) of one image.

    rng=None: a centre square crop, no augmentation. Otherwise light augmentation: a random
    square crop covering 80-100% of the short side, and a horizontal flip half of the time.
    Small images are upscaled (bicubic) like any other.
    """
    w, h = im.size
    side = min(w, h)
    if rng is None:
        x0, y0 = (w - side) // 2, (h - side) // 2
    else:
        side = max(1, int(side * rng.uniform(0.8, 1.0)))
        x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
    im = im.crop((x0, y0, x0 + side, y0 + side))
    if rng is not None and rng.random() < 0.5:
        im = ImageOps.mirror(im)
    vae = _to_tensor(im.resize((resolution, resolution), Image.BICUBIC)) * 2 - 1
    return vae.clamp(-1, 1), clip_tensor(im, clip_size)


def clip_tensor(im: Image.Image, size: int = 224) -> torch.Tensor:
    """A square image -> CLIP input (3, size, size), CLIP mean/std normalised."""
    clip = _to_tensor(im.resize((size, size), Image.BICUBIC))
    return (clip - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def centre_square(im: Image.Image) -> Image.Image:
    w, h = im.size
    s = min(w, h)
    return im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))


# ----------------------------------------------------------------------------------------
# Dataset and sampler


class ConceptImages(Dataset):
    """Images from the chosen sources, as dicts {"vae", "clip", "bad"}.

    Index with an int, or with (index, seed) pairs from ResumableSampler: the seed fixes the
    augmentation, so a run (and a resumed run) sees the same views whatever the worker count.
    An unreadable file is skipped: the next index is used instead and "bad" names the skipped files.
    """

    def __init__(self, data: str | None, openimages: str | None, resolution: int, clip_size: int = 224,
                 augment: bool = True, synthetic_seed: int = 0):
        self.items: list = []
        if data == SYNTHETIC:
            self.items += [(SYNTHETIC, i) for i in range(SYNTHETIC_SIZE)]
        elif data:
            self.items += list_image_folder(data)
        if openimages:
            self.items += list_openimages(openimages)
        if not self.items:
            raise FileNotFoundError("no images found (give --data DIR, --data synthetic, or --openimages DIR)")
        self.resolution, self.clip_size, self.augment = resolution, clip_size, augment
        self.synthetic_seed = synthetic_seed

    def __len__(self):
        return len(self.items)

    def _image(self, i: int) -> Image.Image:
        src, arg = self.items[i]
        if src == SYNTHETIC:
            return synthetic_image(arg, seed=self.synthetic_seed)
        return load_image(src, arg)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        bad = []
        for k in range(len(self.items)):
            i = (index + k) % len(self.items)
            try:
                im = self._image(i)
                break
            except BadImage:
                bad.append(str(self.items[i][0]))
        else:
            raise RuntimeError("every image in the data set is unreadable")
        rng = random.Random(seed) if self.augment else None
        vae, clip = make_views(im, self.resolution, self.clip_size, rng)
        # "bad": the unreadable files skipped on the way, one per line ("" for none); a string, so
        # that the default collate keeps it (the trainer counts distinct names per epoch).
        return {"vae": vae, "clip": clip, "bad": "\n".join(bad)}


class ResumableSampler(Sampler):
    """DistributedSampler (shuffled, drop_last) for one epoch, minus its first `skip` entries,
    yielding (index, augmentation seed) pairs. Resume = same epoch, skip = batches done * batch."""

    def __init__(self, n: int, world: int, rank: int, seed: int, epoch: int, skip: int = 0):
        self.dist = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.dist.set_epoch(epoch)
        self.seed, self.epoch, self.skip = seed, epoch, skip

    def __iter__(self):
        for pos, index in enumerate(self.dist):
            if pos >= self.skip:
                # hash() of a tuple of ints is the same in every process and every run (only str
                # and bytes hashes are randomised): the augmentation of an image depends on
                # (seed, epoch, index) alone, whatever the rank, worker count or resume point.
                yield index, hash((self.seed, self.epoch, index)) & 0x7FFFFFFF  # 31-bit seed

    def __len__(self):
        return max(0, len(self.dist) - self.skip)


def main(argv=None):
    p = argparse.ArgumentParser(description="Write one synthetic concept image (for the quick start).")
    p.add_argument("--example", default="examples/concept.png", help="output PNG path")
    p.add_argument("--index", type=int, default=3, help="which synthetic image (index %% 5 picks the shape)")
    p.add_argument("--size", type=int, default=512)
    a = p.parse_args(argv)
    os.makedirs(os.path.dirname(a.example) or ".", exist_ok=True)
    image = synthetic_image(a.index, size=a.size)
    atomic_write(a.example, image.save)
    print(f"wrote {a.example}", file=sys.stderr)


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a bad file, not a grey one

if __name__ == "__main__":
    main()
