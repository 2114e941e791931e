"""data.decode: gpu: workers read JPEG bytes, the batch is decoded and transformed on the device.

The decoder is device-agnostic, so these tests run it on the CPU (libjpeg) and require exactly the CPU path's pixels;
on a CUDA machine (tests/gpu/run.sh) the same comparison runs with nvjpeg, within a small tolerance.
"""

from __future__ import annotations

import os
import resource

import pytest
import torch
from conftest import make_image_folder

from utp_dist.config import DataConfig
from utp_dist.data.device_input import DeviceDecoder
from utp_dist.data.loaders import IGNORE_LABEL, DataError, ImageFolderSplit, InputSpec, build_loader, build_transforms, index_splits

SPEC = InputSpec(size=(16, 16), resize=(18, 18), mean=(0.5,) * 3, std=(0.5,) * 3)


def batches(root, encoded: bool, augment: str, on_bad_image: str = "error", epoch: int = 1, device: str = "cpu", batch_size=8, workers=0):
    """Every train batch of one epoch, through the CPU path or the encoded path (decoded by DeviceDecoder)."""
    cfg = DataConfig(root=str(root), batch_size=batch_size, num_workers=workers, augment=augment, on_bad_image=on_bad_image)
    samples = index_splits(cfg, seed=3).samples["train"]
    train_tf, eval_tf = build_transforms(SPEC, augment)
    random = augment != "none"
    dataset = ImageFolderSplit(samples, train_tf if random else eval_tf, 3, on_bad_image, random, encoded_jpeg=encoded)
    loader, sampler = build_loader(dataset, cfg, 3, True, 1, False)
    loader.timeout = 60 if workers else 0  # a worker that cannot deliver a batch fails the test instead of hanging it
    sampler.set_epoch(epoch)
    return list(loader), DeviceDecoder(torch.device(device), train_tf if random else eval_tf, 3, random, on_bad_image)


@pytest.mark.parametrize("augment", ["none", "standard"])
def test_encoded_batches_decode_to_exactly_the_cpu_pixels(tmp_path, augment):
    root = make_image_folder(tmp_path / "mixed", per_class={"train": 8, "val": 2})  # half JPEG, half PNG (decoded by the workers)
    cpu, _ = batches(root, encoded=False, augment=augment)
    encoded, decoder = batches(root, encoded=True, augment=augment)
    assert sum(isinstance(item, torch.Tensor) for b in encoded for item in b[0].unpack()) == 12  # the PNGs
    for (images, labels), (batch, enc_labels) in zip(cpu, encoded, strict=True):
        decoded, dec_labels = decoder(batch, enc_labels)
        assert decoded.dtype == torch.uint8 and decoded.device.type == "cpu"
        assert torch.equal(decoded.cpu(), images) and torch.equal(dec_labels.cpu(), labels)
    assert decoder.cpu_fallbacks == 0


def test_a_worker_sends_a_batch_through_one_file_descriptor_not_one_per_image(tmp_path):
    # Each tensor a DataLoader worker returns travels through a file descriptor of its own. With one tensor per image,
    # 14 workers x 2 batches ahead x 128 images outran the usual limit of 1,024 open files and the loader hung
    # ('Bad file descriptor' in the worker; seen on a GPU machine with data.decode: gpu). Here: 48 files over the limit.
    root = make_image_folder(tmp_path / "mixed", per_class={"train": 48, "val": 2})  # 144 images, half JPEG, half PNG
    cpu, _ = batches(root, encoded=False, augment="none", batch_size=48)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 48, hard))  # the workers inherit it
    try:
        encoded, decoder = batches(root, encoded=True, augment="none", batch_size=48, workers=2)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert [len(batch.sources) for batch, _ in encoded] == [48, 48, 48]
    for (images, labels), (batch, enc_labels) in zip(cpu, encoded, strict=True):
        decoded, dec_labels = decoder(batch, enc_labels)
        assert torch.equal(decoded, images) and torch.equal(dec_labels, labels)


def test_an_undecodable_jpeg_in_the_batch_is_skipped_or_a_one_line_error(tmp_path):
    root = make_image_folder(tmp_path / "mixed", per_class={"train": 10, "val": 2})  # 30 + 2 bad = 4 whole batches
    (root / "train" / "cat" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # fails on the device
    (root / "train" / "dog" / "zz_empty.jpg").write_bytes(b"")  # fails already in the worker, reading the bytes
    encoded, decoder = batches(root, encoded=True, augment="none", on_bad_image="skip")
    labels = torch.cat([decoder(b, labels)[1] for b, labels in encoded])
    assert (labels == IGNORE_LABEL).sum() == 2 and len(labels) == 32  # the good files of each batch still decode
    with pytest.raises(DataError, match="cannot decode image '.*zz_(broken|empty).jpg'"):
        encoded, decoder = batches(root, encoded=True, augment="none", on_bad_image="error")
        for batch, labels in encoded:
            decoder(batch, labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvjpeg needs CUDA: tests/gpu/run.sh runs this on a GPU machine")
def test_nvjpeg_matches_the_cpu_path_within_tolerance(tmp_path):
    root = make_image_folder(tmp_path / "mixed", per_class={"train": 8, "val": 2})
    cpu, _ = batches(root, encoded=False, augment="standard")
    encoded, decoder = batches(root, encoded=True, augment="standard", device="cuda")
    for (images, _), (batch, labels) in zip(cpu, encoded, strict=True):
        decoded, _ = decoder(batch, labels.cuda())
        assert decoded.device.type == "cuda"
        assert (decoded.cpu().float() - images.float()).abs().mean() < 3  # IDCT rounding differs between decoders
