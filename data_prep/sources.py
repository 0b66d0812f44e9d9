"""Image sources, what `vitae prep SOURCE` reads: an image-folder tree, Parquet file(s) (streamed by
row group), or `digits`, listed as labelled, lazily-read images; what cannot even be listed becomes
a `Reject`.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

from infra.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}
# The digits are 8x8 pixels, rendered at --digits-size: no model trains on larger images (model.img_size
# is at most 1024), and each rendering holds 4 bytes per pixel (100000 px took 22 GB before one image).
MAX_DIGITS_SIZE = 1024


@dataclass(frozen=True)
class SourceImage:
    source_id: str
    label: int
    split: str | None  # the source's own split, if it has them
    read: Callable[[], bytes]


@dataclass(frozen=True)
class Reject:
    source_id: str
    reason: str


@dataclass
class Source:
    description: str
    class_names: list[str]
    images: list[SourceImage]
    rejects: list[Reject] = field(default_factory=list)

    @property
    def has_splits(self) -> bool:
        return all(image.split is not None for image in self.images)


@dataclass(frozen=True)
class SourceOptions:
    image_column: str = "image"
    label_column: str = "label"
    class_names: list[str] | None = None
    digits_size: int = 32


def open_source(spec: str, spill_dir: Path, options: SourceOptions = SourceOptions()) -> Source:
    """List the images of `spec` (a path or `digits`); raises `UserError` if it holds none. A Parquet
    source's image bytes are copied to `spill_dir`, which must outlive the `Source`."""
    if spec == "digits":
        source = digits_source(options)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise UserError(f"source not found: {spec}")
        if path.is_file() and path.suffix != ".parquet":
            raise UserError(f"unsupported source {spec}: expected an image folder, Parquet file(s) or 'digits'")
        if path.suffix == ".parquet" or any(path.rglob("*.parquet")):
            source = parquet_source(path, options, spill_dir)
        else:
            source = folder_source(path, options)
    if not source.images:
        raise UserError(f"no images found in {source.description}")
    return source


def class_index(found: set[str], given: list[str] | None, where: str) -> dict[str, int]:
    """Class name -> index: the given order, else sorted names found in the data."""
    if given is None:
        return {name: index for index, name in enumerate(sorted(found))}
    unknown = sorted(found - set(given))
    if unknown:
        raise UserError(f"{where}: classes not in --class-names: {', '.join(unknown[:5])}")
    return {name: index for index, name in enumerate(given)}


# --- image folders -------------------------------------------------------------------------------


def folder_source(root: Path, options: SourceOptions) -> Source:
    top = _visible_dirs(root)
    presplit = bool(top) and "train" in {d.name for d in top} and all(d.name in SPLIT_NAMES for d in top)
    if presplit:
        class_dirs = [(SPLIT_NAMES[split.name], c) for split in top for c in _visible_dirs(split)]
    else:
        class_dirs = [(None, c) for c in top]
    if not class_dirs:
        layout = "ROOT/{train,val,test}/<class>/<image>" if presplit else "ROOT/<class>/<image>"
        raise UserError(f"no class folders in {root}: expected {layout}")
    classes = class_index({c.name for _, c in class_dirs}, options.class_names, str(root))
    images, rejects = [], []
    for split, class_dir in class_dirs:
        for path in _visible_files(class_dir):
            source_id = path.relative_to(root).as_posix()
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(SourceImage(source_id, classes[class_dir.name], split, path.read_bytes))
            else:
                rejects.append(Reject(source_id, f"not an image file ({path.suffix or 'no extension'})"))
    return Source(f"image folder {root}", list(classes), images, rejects)


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _visible_files(directory: Path) -> list[Path]:
    """Files (and dangling links) below `directory`, skipping hidden files and folders."""
    return sorted(p for p in directory.rglob("*") if not p.is_dir()
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


# --- Parquet ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpilledBytes:
    """One image's bytes, copied from its Parquet row group into a local spill file (a picklable reader)."""

    path: Path
    offset: int
    length: int

    def __call__(self) -> bytes:
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            return file.read(self.length)


def parquet_source(path: Path, options: SourceOptions, spill_dir: Path) -> Source:
    """The rows of Parquet file(s), streamed one row group at a time: labels are read as a column,
    image bytes are copied to a spill file in `spill_dir` (never a whole file in memory)."""
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    splits = {f: _split_of(f.relative_to(path) if path.is_dir() else Path(f.name)) for f in files}
    if len(set(s is None for s in splits.values())) > 1:
        raise UserError(f"{path}: some Parquet files name a split (train/val/test) and some do not")
    opened, rejects = [], []
    for file in files:
        parquet = _open_parquet(file, options, rejects)
        if parquet is not None:
            opened.append((file, parquet))
    labels, classes = _parquet_labels(opened, options, path)
    images = []
    for index, ((file, parquet), file_labels) in enumerate(zip(opened, labels)):
        source_file = file.relative_to(path).as_posix() if path.is_dir() else file.name
        spilled = _spill_images(parquet, options.image_column, file, spill_dir / f"{index}.bin")
        for row, (label, read) in enumerate(zip(file_labels, spilled)):
            source_id = f"{source_file}#{row}"
            if label is None or not 0 <= label < len(classes):
                rejects.append(Reject(source_id, f"label {label!r} is not a class index < {len(classes)}"))
            elif read is None:
                rejects.append(Reject(source_id, "no image bytes"))
            else:
                images.append(SourceImage(source_id, label, splits[file], read))
    return Source(f"Parquet {path}", classes, images, rejects)


def _split_of(relative: Path) -> str | None:
    for part in (*relative.parent.parts, relative.stem):
        name = re.split(r"[-_.]", part)[0].lower()
        if name in SPLIT_NAMES:
            return SPLIT_NAMES[name]
    return None


def _open_parquet(file: Path, options: SourceOptions, rejects: list[Reject]):
    """`file` as a `pyarrow.parquet.ParquetFile`, or None (and a reject) if it is not readable Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as error:
        rejects.append(Reject(file.name, f"unreadable Parquet file ({error})"))
        return None
    names = parquet.schema_arrow.names
    missing = [column for column in (options.image_column, options.label_column) if column not in names]
    if missing:  # a UserError, not a reject: every file would fail the same way
        raise UserError(f"{file}: no column {missing[0]!r} (columns: {', '.join(names)}); "
                        "use --image-column / --label-column")
    return parquet


def _spill_images(parquet, column: str, file: Path, spill: Path) -> list[SpilledBytes | None]:
    """Copy the image bytes of `parquet` to `spill`, one row group at a time; a reader per row (None: no bytes)."""
    readers: list[SpilledBytes | None] = []
    with open(spill, "wb") as out:
        for group in range(parquet.num_row_groups):
            with _reading(file):
                images = _image_bytes(parquet.read_row_group(group, columns=[column]).column(column), column, file)
            for value in images:
                data = value.as_py()
                readers.append(None if data is None else SpilledBytes(spill, out.tell(), len(data)))
                if data is not None:
                    out.write(data)
    return readers


@contextlib.contextmanager
def _reading(file: Path) -> Iterator[None]:
    """A Parquet file whose footer read but whose data does not: one line naming it."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{file}: unreadable Parquet data ({' '.join(str(error).split())})") from None


def _image_bytes(chunked, column: str, file: Path):
    import pyarrow as pa

    images = chunked.combine_chunks()
    if pa.types.is_struct(images.type) and images.type.get_field_index("bytes") >= 0:
        return images.field("bytes")
    if pa.types.is_binary(images.type) or pa.types.is_large_binary(images.type):
        return images
    raise UserError(f"{file}: column {column!r} is {images.type}, expected binary or struct<bytes, path>")


def _parquet_labels(opened, options: SourceOptions, path: Path) -> tuple[list[list], list[str]]:
    """Per-file label indices (None where missing) and the class names."""
    import pyarrow as pa

    columns = []
    for file, parquet in opened:
        with _reading(file):
            columns.append(parquet.read(columns=[options.label_column]).column(0))
    if all(pa.types.is_integer(c.type) for c in columns):
        labels = [c.to_pylist() for c in columns]
        names = options.class_names or _hf_class_names(opened, options.label_column)
        if names is None:
            names = [str(i) for i in range(max((l for ls in labels for l in ls if l is not None), default=-1) + 1)]
        return labels, list(names)
    if all(pa.types.is_string(c.type) or pa.types.is_large_string(c.type) for c in columns):
        texts = [c.to_pylist() for c in columns]
        classes = class_index({t for ts in texts for t in ts if t is not None}, options.class_names, str(path))
        return [[classes.get(t) for t in ts] for ts in texts], list(classes)
    types = ", ".join(sorted({str(c.type) for c in columns}))
    raise UserError(f"{path}: label column {options.label_column!r} is {types}, expected integers or strings")


def _hf_class_names(opened, column: str) -> list[str] | None:
    """Class names from a Hugging Face `ClassLabel` feature in the Parquet schema metadata."""
    for _, parquet in opened:
        metadata = (parquet.schema_arrow.metadata or {}).get(b"huggingface")
        if metadata:
            feature = json.loads(metadata).get("info", {}).get("features", {}).get(column, {})
            if feature.get("_type") == "ClassLabel" and feature.get("names"):
                return feature["names"]
    return None


# --- scikit-learn digits -------------------------------------------------------------------------


def digits_source(options: SourceOptions) -> Source:
    from sklearn.datasets import load_digits

    if options.class_names is not None:
        raise UserError("--class-names does not apply to the digits source")
    digits = load_digits()
    images = [
        SourceImage(f"digits:{i}", int(label), None, partial(_digit_png, pixels, options.digits_size))
        for i, (pixels, label) in enumerate(zip(digits.images, digits.target))
    ]
    return Source("scikit-learn digits", [str(d) for d in range(10)], images)


def _digit_png(pixels, size: int) -> bytes:
    from PIL import Image

    gray = Image.fromarray((pixels * (255 / 16)).round().astype("uint8"))  # 2-D uint8: mode L
    buffer = io.BytesIO()
    gray.resize((size, size), Image.Resampling.BILINEAR).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()
