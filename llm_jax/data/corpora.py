"""Text corpora as TFDS datasets in array_record files, read by random access (no TensorFlow).

`data.dataset` names one of three kinds:
  'stdlib'  the Python standard library's own *.py files: on every machine that runs us
  'files'   the local text files named by `data.files` (comma-separated paths or globs)
  any other name: a TFDS catalogue dataset (lm1b, c4, ...) already prepared under
            `data.tfds_data_dir` in array_record format (this machine has no internet);
            its own splits, `data.text_key` as the text, the first `data.max_documents` of each

The first two are prepared by the `TextFiles` builder: one document per file, in sorted path
order (the fixed order), of which `data.max_documents` keeps the first N and
`data.validation_fraction` holds out documents spread evenly by position. Each corpus gets its
own builder config, named from a fingerprint of everything that decides its content (Python
version, every file's path, size and mtime, max_documents, validation_fraction), so a changed
file list or another Python never reads a stale cache.

`load_split(data_cfg, split)` returns a random-access sequence of strings for
`grain.MapDataset.source`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import fractions
import glob
import hashlib
import json
import math
import os
import platform
import sysconfig
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds
from absl import logging as absl_logging

STDLIB = "stdlib"
FILES = "files"
TRAIN = "train"
VALIDATION = "validation"
# Directories under the stdlib that hold installed packages, not the standard library.
_THIRD_PARTY_DIRS = ("site-packages", "dist-packages")


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
    """The documents of one corpus: `root`/`paths[i]`, in this order (the fixed order)."""

    root: str = ""
    # Left out of repr: TFDS logs the config each time a builder is made.
    paths: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    validation_fraction: float = 0.0


class TextFiles(tfds.core.GeneratorBasedBuilder):
    """Text files as documents `{'text', 'path'}`; splits 'train' and 'validation'."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One document per file, files in sorted order, validation by position."}
    # Nothing to download. Saying so also skips TFDS's search for a checksums file next to this
    # module, which imports `importlib_resources`: not a TFDS requirement, and not installed.
    url_infos = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text files, one document per file.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
            # Keep the generation order on disk: the documents stay in the fixed (sorted) order.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the files are local.
        config = self.builder_config
        is_validation = validation_positions(len(config.paths), config.validation_fraction)
        splits = {
            TRAIN: [i for i in range(len(config.paths)) if not is_validation[i]],
            VALIDATION: [i for i in range(len(config.paths)) if is_validation[i]],
        }
        return {name: self._generate_examples(positions) for name, positions in splits.items() if positions}

    def _generate_examples(self, positions: Sequence[int]) -> Iterator[tuple[int, dict[str, str]]]:
        config = self.builder_config
        for position in positions:
            path = config.paths[position]
            with open(os.path.join(config.root, path), "rb") as f:
                # Not every text file is UTF-8 (the stdlib has a few latin-1 test files); keep the rest.
                text = f.read().decode("utf-8", errors="replace")
            yield position, {"text": text, "path": path}


def validation_positions(num_documents: int, fraction: float) -> list[bool]:
    """Marks document i as held out when the running count ceil(i * fraction) steps up at i.

    That is every k-th document, starting with the first, for fraction = 1/k, and ceil(n * f)
    documents spread evenly for any fraction, so even a small max_documents has a validation split.
    """
    exact = fractions.Fraction(str(fraction))  # '0.02' exactly, not the nearest binary float
    return [math.ceil((i + 1) * exact) > math.ceil(i * exact) for i in range(num_documents)]


class TextSource:
    """One split's texts by position: `len()` and `[i] -> str`, as `grain.MapDataset.source` wants.

    `max_documents` > 0 keeps only the first ones.
    """

    def __init__(self, data_source: Sequence[dict], text_key: str, max_documents: int = 0):
        self._data_source = data_source
        self._text_key = text_key
        self._length = min(len(data_source), max_documents) if max_documents > 0 else len(data_source)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < self._length:
            raise IndexError(f"document {index} of {self._length}")
        text = self._data_source[index][self._text_key]
        return text.decode("utf-8") if isinstance(text, bytes) else text


def load_split(data_cfg, split: str) -> TextSource:
    """The texts of `split` of the corpus `data_cfg.dataset`, preparing it on first use."""
    if data_cfg.dataset in (STDLIB, FILES):
        config = stdlib_config(data_cfg) if data_cfg.dataset == STDLIB else files_config(data_cfg)
        builder = _prepared_text_files(config, data_cfg.tfds_data_dir)
        return TextSource(_split_source(builder, split, data_cfg.dataset), "text")
    return _catalogue_split(data_cfg, split)


def stdlib_config(data_cfg) -> TextFilesConfig:
    """The standard library's *.py files, sorted by path relative to the stdlib directory."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, subdirectories, filenames in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in _THIRD_PARTY_DIRS]
        relative_dir = os.path.relpath(directory, root)
        paths += [os.path.normpath(os.path.join(relative_dir, f)) for f in filenames if f.endswith(".py")]
    return _corpus_config(f"stdlib_py{platform.python_version()}", root, sorted(paths), data_cfg)


def files_config(data_cfg) -> TextFilesConfig:
    """The files named by `data.files`, sorted by absolute path, empty files left out."""
    paths = set()
    for pattern in filter(None, (p.strip() for p in data_cfg.files.split(","))):
        if any(char in pattern for char in "*?["):
            matches = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
            if not matches:
                raise ValueError(f"data.files: {pattern!r} matches no file")
        else:
            matches = [os.path.expanduser(pattern)]
        for path in matches:
            _check_readable(path)
            paths.add(os.path.abspath(path))
    nonempty = sorted(p for p in paths if os.path.getsize(p) > 0)
    if not nonempty:
        raise ValueError(f"data.files={data_cfg.files!r} holds no text (no files, or only empty ones)")
    return _corpus_config("files", "/", nonempty, data_cfg)


def _check_readable(path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"data.files: cannot read {path!r} ({e.strerror})") from None


def _corpus_config(kind: str, root: str, paths: list[str], data_cfg) -> TextFilesConfig:
    """The config of the first `data.max_documents` of `paths`, named by a fingerprint of its content."""
    if data_cfg.max_documents > 0:
        paths = paths[: data_cfg.max_documents]
    num_validation = sum(validation_positions(len(paths), data_cfg.validation_fraction))
    if num_validation == len(paths):
        raise ValueError(
            f"data.validation_fraction={data_cfg.validation_fraction} holds out all {len(paths)} "
            f"documents of {kind}: use more documents (data.max_documents) or a smaller fraction"
        )
    stats = [(path, *_size_and_mtime(os.path.join(root, path))) for path in paths]
    identity = json.dumps([kind, root, stats, data_cfg.validation_fraction])
    fingerprint = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return TextFilesConfig(
        name=f"{kind}_{fingerprint}".replace(".", "_"),
        description=f"{kind}: {len(paths)} files under {root}, validation_fraction={data_cfg.validation_fraction}",
        root=root,
        paths=tuple(paths),
        validation_fraction=data_cfg.validation_fraction,
    )


def _size_and_mtime(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


class _DropCustomConfigWarning:
    """TFDS warns "Using custom data configuration" each time one of our builders is made: our
    configs are custom by design (one per corpus fingerprint), so the warning says nothing."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("Using custom data configuration")


absl_logging.get_absl_logger().addFilter(_DropCustomConfigWarning())


def _prepared_text_files(config: TextFilesConfig, data_dir: str) -> TextFiles:
    """The builder of `config`, prepared once even when several processes ask at the same time."""
    builder = TextFiles(config=config, data_dir=data_dir or None, file_format="array_record")
    if builder.is_prepared():
        return builder
    with _exclusive_lock(builder.data_dir + ".lock"):
        # Another process may have prepared it while this one waited for the lock.
        builder = TextFiles(config=config, data_dir=data_dir or None, file_format="array_record")
        if not builder.is_prepared():
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


@contextlib.contextmanager
def _exclusive_lock(lock_path: str):
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _split_source(builder: tfds.core.DatasetBuilder, split: str, dataset: str) -> Sequence[dict]:
    try:
        return builder.as_data_source(split=split)
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"data.dataset={dataset!r} has no split {split!r} (data.train_split / data.eval_split); "
            f"it has {sorted(builder.info.splits)}"
        ) from e


def _catalogue_split(data_cfg, split: str) -> TextSource:
    """A split of a TFDS catalogue dataset that is already prepared locally in array_record format."""
    name = data_cfg.dataset
    try:
        builder = tfds.builder(name, data_dir=data_cfg.tfds_data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"data.dataset={name!r} is not {STDLIB!r}, {FILES!r} or a TFDS catalogue name") from None
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"data.dataset={name!r} is not prepared in {builder.data_dir} and there is no internet here: "
            f"run `tfds build {name} --file_format=array_record` where there is, copy the result under "
            f"data.tfds_data_dir, or use data.dataset={STDLIB!r}"
        )
    if data_cfg.text_key not in builder.info.features:
        raise ValueError(
            f"data.text_key={data_cfg.text_key!r} is not a feature of {name!r}: {sorted(builder.info.features)}"
        )
    try:
        source = _split_source(builder, split, name)
    except NotImplementedError:  # TFDS reads by random access only from array_record (or parquet).
        raise ValueError(
            f"data.dataset={name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}, "
            f"not array_record: rebuild it with `tfds build {name} --file_format=array_record`"
        ) from None
    return TextSource(source, data_cfg.text_key, data_cfg.max_documents)
