"""The device JPEG decoder against live tensors (pytorch/vision#9606): while kernels queued on the current
stream still read and write freed-and-reused memory, batched nvJPEG decodes must give the images a CPU decode
gives, and must not touch a tensor that is still in use."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from bench.data.device_decode import decode_images

pytestmark = pytest.mark.gpu


def jpeg_bytes(seed: int, size: int = 256) -> torch.Tensor:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def test_device_decodes_under_queued_work_match_a_quiet_decode_and_spare_live_tensors():
    device = torch.device("cuda")
    files = [jpeg_bytes(seed) for seed in range(32)]
    paths = [f"{seed}.jpg" for seed in range(32)]
    reference = [image.cpu() for image in decode_images(files, paths, device)]
    # nvJPEG and libjpeg may differ by rounding; the race gives garbage, far beyond it
    for cpu, gpu in zip((decode_jpeg(f, mode=ImageReadMode.RGB) for f in files), reference, strict=True):
        assert (cpu.int() - gpu.int()).abs().float().mean() < 2.0
    live = torch.full((4096, 4096), 7.0, device=device)
    for _ in range(20):
        busy = torch.randn(4096, 4096, device=device)
        for _ in range(8):  # queued products whose temporaries are freed while still being computed
            busy = (busy @ busy.T).div_(4096).tanh_()
        decoded = decode_images(files, paths, device)
        torch.cuda.synchronize()
        for image, expected in zip(decoded, reference, strict=True):
            assert torch.equal(image.cpu(), expected)
        assert bool((live == 7.0).all())
