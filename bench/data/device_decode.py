"""`data.decode: gpu`: DataLoader workers only read image files; batches are decoded and augmented on the
device.

The workers hand over each file's bytes (`ImageList.encoded`), its label and, in training, the per-sample
augmentation seed that `bench.data.seeding.SeededBatches` paired with its index. The batch arrives as an
:class:`EncodedBatch`, and `batch.to(device)` is where it becomes the model's input: JPEGs are decoded in one
batched `torchvision.io.decode_jpeg(..., device=device)` call (nvJPEG on CUDA), then each image goes through
the geometry stage of the dataset's own transform (RandomResizedCrop + flip, or Resize + CenterCrop: v2 ops
on the device tensor) with torch's CPU generator seeded by its sample seed, and the stacked batch through the
conversion stage (to float, ImageNet normalisation). The crop and flip parameters are therefore the CPU
path's for the same seed, and a resumed run replays identical batches; only the resampling arithmetic differs
from PIL's (see tests/data/test_device_decode.py for the measured gap).

The code is the same whatever the device: on the CPU it runs libjpeg and the CPU kernels, which is how the
tests exercise it. A run refuses `gpu` on a device other than CUDA (`check_decode_device`), since there it
only moves the decoding into the main process. Files that are not JPEGs (PNG) are decoded on the CPU of the
main process by `torchvision.io.decode_image` and then moved: correct, but slower than `data.decode: cpu`,
so use that for PNG datasets. A JPEG that the device decoder rejects (nvJPEG lacks some variants, e.g.
CMYK) is decoded the same way; a file nothing can decode fails naming it.

On CUDA the host waits for the stream's pending work before each device decode and for the decode itself
after it (`wait_for_device`): nvJPEG writes its output from its own stream into memory that the caching
allocator may have handed back while kernels queued on the current stream still use it, which corrupted
live tensors on H100s (pytorch/vision#9606, pytorch/torchcodec#1634: only a host-side wait avoids it). Both
the training step and evaluation (`bench.evaluate`) decode through `EncodedBatch.to`, so both are covered.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2

from bench.config import ConfigError
from bench.data import DatasetBundle, DatasetError
from bench.data.images import ImageList, io_error_text
from bench.data.seeding import SeededSamples
from bench.data.transforms import stages

JPEG_START = [0xFF, 0xD8, 0xFF]  # SOI marker and the first byte of the next marker


def check_decode_device(decode: str, device: torch.device, *, any_device: bool = False) -> None:
    """Fail before any data is read when `data.decode: gpu` meets a device other than CUDA.

    `any_device` lets tests and benchmarks run the device path on the CPU; no command exposes it.
    """
    if decode == "gpu" and device.type != "cuda" and not any_device:
        raise ConfigError(
            f"data.decode: gpu decodes and augments images on a CUDA device, but this run's device is "
            f"{device.type}; use data.decode: cpu (--set data.decode=cpu) or --device cuda"
        )


def set_decode(bundle: DatasetBundle, decode: str) -> None:
    """Make every split of `bundle` load the way `data.decode` says (idempotent)."""
    for dataset in _datasets(bundle):
        if decode == "gpu":
            _check_decodable_on_device(dataset, bundle.name)
        if isinstance(dataset, ImageList):
            dataset.decode = decode


def _check_decodable_on_device(dataset: Dataset, name: str) -> None:
    """Image files, without `data.skip_bad_images` (a bad file is found on the device, after its batch was
    drawn: too late to stand in another), with a transform of ours (else it would fail mid-epoch)."""
    if not isinstance(dataset, ImageList):
        raise ConfigError(
            f"data.decode: gpu decodes image files on the device, but dataset {name!r} holds its images in "
            f"memory ({type(dataset).__name__}); use data.decode: cpu"
        )
    if dataset.skip_bad_images:
        raise ConfigError(
            "data.skip_bad_images needs data.decode: cpu (with gpu a bad file is found on the device, after "
            "its batch was drawn); find bad files with `smoothap-bench data check`"
        )
    stages(dataset.transform)


def _datasets(bundle: DatasetBundle) -> Iterator[Dataset]:
    yield bundle.train
    for split in ([bundle.val] if bundle.val is not None else []) + bundle.tests:
        yield split.query
        if split.gallery is not None:
            yield split.gallery


def loader_source(dataset: Dataset, seeded: bool = False) -> dict[str, Any]:
    """`dataset` and `collate_fn` for a DataLoader over `dataset`: items decoded by the workers, or, for an
    ImageList set to decode on the device, file bytes collated into an :class:`EncodedBatch`. `seeded`: the
    loader's sampler gives (index, seed) pairs (`SeededBatches`), each item loaded under its seed."""
    if getattr(dataset, "decode", "cpu") == "gpu":
        return {
            "dataset": EncodedItems(dataset),
            "collate_fn": partial(collate_encoded, transform=dataset.transform),
        }
    return {"dataset": SeededSamples(dataset) if seeded else dataset}


class EncodedItem(NamedTuple):
    """One file as a worker hands it over."""

    data: Tensor  # the file's bytes, uint8, 1-D, on the CPU
    label: int
    seed: int | None  # the sample's augmentation seed; None: the transform runs unseeded (evaluation)
    path: str


class EncodedItems(Dataset):
    """An ImageList's items as file bytes: item `index` (evaluation) or `(index, seed)` (training)."""

    def __init__(self, dataset: ImageList) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> EncodedItem:
        index, seed = item if isinstance(item, tuple) else (item, None)
        data, label = self.dataset.encoded(index)
        return EncodedItem(data, label, seed, self.dataset.paths[index])


@dataclass
class EncodedBatch:
    """A batch still encoded, as the workers hand it over. `to(device)` gives the model's input on `device`,
    so the training step and evaluation move it exactly as they move a decoded batch.

    The files' bytes travel as one buffer: a worker passes each tensor through its own file descriptor, so one
    per image would exhaust them, and `read_file`'s tensors (file-mapped, their descriptor closed) cannot be
    passed at all."""

    data: Tensor  # every file's bytes, concatenated
    sizes: list[int]  # each file's length in bytes
    seeds: list[int | None]
    paths: list[str]
    transform: v2.Compose  # the dataset's two-stage transform (bench.data.transforms)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Tensor:
        """Decode, transform and normalise on `device` (`non_blocking` is accepted for the caller's sake: the
        decoders copy the bytes themselves)."""
        return decode_batch(self, torch.device(device))

    def files(self) -> list[Tensor]:
        """Each file's bytes, as views of the buffer."""
        return list(self.data.split(self.sizes))


def collate_encoded(items: list[EncodedItem], transform: v2.Compose) -> tuple[EncodedBatch, Tensor]:
    """(EncodedBatch, labels); the files' bytes differ in length, so they are concatenated, not stacked."""
    batch = EncodedBatch(
        torch.cat([item.data for item in items]),
        [len(item.data) for item in items],
        [item.seed for item in items],
        [item.path for item in items],
        transform,
    )
    return batch, torch.tensor([item.label for item in items], dtype=torch.int64)


def decode_batch(batch: EncodedBatch, device: torch.device) -> Tensor:
    """(N, 3, S, S) float32 on `device`: decoded, each image through the geometry stage under its own seed,
    stacked, converted and normalised."""
    geometry, convert = stages(batch.transform)
    images = decode_images(batch.files(), batch.paths, device)
    shaped = []
    with torch.random.fork_rng(devices=[]):  # crop/flip draws come from the CPU generator, as on the CPU path
        for image, seed in zip(images, batch.seeds, strict=True):
            if seed is not None:
                torch.default_generator.manual_seed(seed)
            shaped.append(geometry(image))
    return convert(torch.stack(shaped)).as_subclass(Tensor)


def decode_images(data: list[Tensor], paths: list[str], device: torch.device) -> list[Tensor]:
    """RGB uint8 (3, H, W) images on `device`, in order: the JPEGs in one batched call there, the rest on the
    CPU (`decode_cpu`)."""
    jpegs = [i for i, encoded in enumerate(data) if encoded[:3].tolist() == JPEG_START]
    decoded = _decode_jpegs([data[i] for i in jpegs], [paths[i] for i in jpegs], device)
    images = dict(zip(jpegs, decoded, strict=True))
    return [images[i] if i in images else decode_cpu(data[i], paths[i]).to(device) for i in range(len(data))]


def _decode_jpegs(data: list[Tensor], paths: list[str], device: torch.device) -> list[Tensor]:
    """One batched decode; if it fails (a bad file, or a variant the device decoder lacks), one at a time,
    with the CPU decoder for those the device rejects."""
    if not data:
        return []
    try:
        return _decode_jpeg_waiting(data, device)
    except RuntimeError:
        return [_decode_one_jpeg(encoded, path, device) for encoded, path in zip(data, paths, strict=True)]


def _decode_one_jpeg(data: Tensor, path: str, device: torch.device) -> Tensor:
    try:
        return _decode_jpeg_waiting(data, device)
    except RuntimeError:
        return decode_cpu(data, path).to(device)


def _decode_jpeg_waiting(data: list[Tensor] | Tensor, device: torch.device) -> list[Tensor] | Tensor:
    """`decode_jpeg` on `device` between two host-side waits (see the module docstring for why)."""
    wait_for_device(device)
    decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    wait_for_device(device)
    return decoded


def wait_for_device(device: torch.device) -> None:
    """Block the host until the work queued on `device`'s current stream is done; nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def decode_cpu(data: Tensor, path: str) -> Tensor:
    """Any format torchvision reads, as RGB uint8 on the CPU; an undecodable file fails naming it."""
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as error:
        raise DatasetError(
            f"cannot decode image {path}: {io_error_text(error)} (data.decode: gpu; "
            "`smoothap-bench data check` lists every unreadable file)"
        ) from error
