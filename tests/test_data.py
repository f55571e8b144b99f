"""CIFAR-10 files and tensors: verification, safe loading, sharding and batched augmentation."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from localsgd_ft.config import DataConfig
from localsgd_ft.storage import cifar10 as cifar_files
from localsgd_ft.storage.cifar10 import DataError, locate, read_batch
from localsgd_ft.training.data import PAD, ShardedBatches, Split, augment, load_cifar10, normalize


def test_checksums_match_torchvision():
    from torchvision.datasets import CIFAR10

    assert cifar_files.TRAIN_FILES == [tuple(x) for x in CIFAR10.train_list]
    assert cifar_files.TEST_FILES == [tuple(x) for x in CIFAR10.test_list]
    assert cifar_files.META_FILE == (CIFAR10.meta["filename"], CIFAR10.meta["md5"])
    assert cifar_files.FOLDER == CIFAR10.base_folder
    assert (DataConfig().url, *cifar_files.ARCHIVE) == (CIFAR10.url, CIFAR10.filename, CIFAR10.tgz_md5)


def test_fixture_is_cifar_format_refused_only_by_checksum(cifar_root):
    from torchvision.datasets import CIFAR10

    # torchvision's own reader accepts the format (its md5 check is what refuses it).
    with pytest.raises(RuntimeError, match="corrupted"):
        CIFAR10(str(cifar_root), train=True, download=False)
    batch = read_batch(Path(cifar_root) / cifar_files.FOLDER / "test_batch")
    with open(Path(cifar_root) / cifar_files.FOLDER / "test_batch", "rb") as f:
        assert pickle.load(f, encoding="latin1")["labels"] == batch["labels"]


def test_verify_refuses_unofficial_data(cifar_root):
    with pytest.raises(DataError, match="not the official CIFAR-10.*data.verify: false"):
        locate(DataConfig(root=str(cifar_root)))
    assert locate(DataConfig(root=str(cifar_root), verify=False)).name == cifar_files.FOLDER


def test_missing_data_says_where_and_how(tmp_path):
    with pytest.raises(DataError) as e:
        locate(DataConfig(root=str(tmp_path)))
    assert str(tmp_path) in str(e.value) and "data.download: true" in str(e.value)


def test_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match="refusing to unpickle"):
        read_batch(p)
    assert not (tmp_path / "pwned").exists()


def test_truncated_file_is_reported(tmp_path, cifar_root):
    src = (Path(cifar_root) / cifar_files.FOLDER / "test_batch").read_bytes()
    p = tmp_path / "test_batch"
    p.write_bytes(src[: len(src) // 2])
    with pytest.raises(DataError, match="not a readable CIFAR-10 batch file"):
        read_batch(p)


def test_load_split_shapes(cifar_root):
    train, test = load_cifar10(DataConfig(root=str(cifar_root), verify=False), torch.device("cpu"))
    assert train.images.shape == (1000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (500, 3, 32, 32) and set(train.labels.tolist()) == set(range(10))


def _split(n: int = 64) -> Split:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    return Split(images, torch.arange(n))


def test_shards_are_disjoint_and_cover_the_epoch():
    split = _split(64)
    seen = []
    for g in range(2):
        batches = ShardedBatches(split, g, 2, 8, seed=0, augment=False)
        labels = torch.cat([batches.batch(s)[1] for s in range(4)])  # one epoch of a 32-image shard
        seen.append(set(labels.tolist()))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(64))


def test_every_worker_of_every_group_has_its_own_shard():
    from localsgd_ft.training.data import shard_of

    split, groups, workers = _split(96), 3, 2
    seen = [set() for _ in range(groups * workers)]
    for g in range(groups):
        for w in range(workers):
            s = shard_of(g, w, workers)
            batches = ShardedBatches(split, s, groups * workers, 8, seed=0, augment=False)
            seen[s] = set(torch.cat([batches.batch(i)[1] for i in range(2)]).tolist())  # one epoch of 16
    assert sorted(shard_of(g, w, workers) for g in range(groups) for w in range(workers)) == list(range(6))
    assert all(a.isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1:])
    assert set().union(*seen) == set(range(96))


def test_batches_depend_only_on_seed_group_and_step():
    split = Split(torch.randint(0, 255, (64, 3, 32, 32), dtype=torch.uint8), torch.arange(64))
    a = ShardedBatches(split, 0, 2, 8, seed=1, augment=True)
    b = ShardedBatches(split, 0, 2, 8, seed=1, augment=True)
    forward = [a.batch(s) for s in range(10)]
    backward = [b.batch(s) for s in reversed(range(10))][::-1]  # any order, any resume point
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(forward, backward))
    assert not torch.equal(forward[0][1], forward[4][1])  # a new permutation in epoch 1
    assert a.position(9) == (2, 1)
    other = ShardedBatches(split, 0, 2, 8, seed=2, augment=True)
    assert not torch.equal(other.batch(0)[1], forward[0][1])


def test_batch_larger_than_shard_is_refused():
    with pytest.raises(DataError, match="lower data.batch_size"):
        ShardedBatches(_split(16), 0, 2, 32, seed=0, augment=False)


def test_augment_is_a_shifted_possibly_flipped_crop():
    gen = torch.Generator().manual_seed(0)
    img = torch.randint(0, 255, (16, 3, 32, 32), dtype=torch.uint8)
    out = augment(img, gen)
    assert out.shape == img.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(img, (PAD,) * 4)
    for i in range(16):
        found = False
        for dy in range(2 * PAD + 1):
            for dx in range(2 * PAD + 1):
                crop = padded[i, :, dy:dy + 32, dx:dx + 32]
                if torch.equal(out[i], crop) or torch.equal(out[i], crop.flip(-1)):
                    found = True
        assert found, f"sample {i} is not a crop of its padded input"


def test_normalize_is_per_channel():
    x = torch.full((1, 3, 2, 2), 128, dtype=torch.uint8)
    y = normalize(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert np.allclose(y[0, :, 0, 0].numpy(), [(128 / 255 - m) / s for m, s in
                                               zip((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))], atol=1e-5)


def test_channels_last_batches_hold_the_same_values():
    split = Split(torch.randint(0, 255, (32, 3, 32, 32), dtype=torch.uint8), torch.arange(32))
    plain = ShardedBatches(split, 0, 1, 8, seed=0, augment=True).batch(3)[0]
    cl = ShardedBatches(split, 0, 1, 8, seed=0, augment=True, channels_last=True).batch(3)[0]
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(plain, cl)


def _serve(payload: bytes, declared: int):
    """A loopback HTTP server that answers every GET with ``payload``, claiming ``declared`` bytes."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(declared))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz"


def _archive(cifar_root: Path) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(cifar_root / cifar_files.FOLDER, arcname=cifar_files.FOLDER)
    return buf.getvalue()


def test_download_unpacks_into_place_atomically(tmp_path, cifar_root, capsys):
    payload = _archive(cifar_root)
    server, url = _serve(payload, len(payload))
    try:
        cfg = DataConfig(root=str(tmp_path / "d"), download=True, verify=False, url=url)
        folder = locate(cfg)
        assert folder == tmp_path / "d" / cifar_files.FOLDER and read_batch(folder / "test_batch")["labels"]
        assert not list((tmp_path / "d").glob(".cifar10-download-*"))
        assert "CIFAR-10: downloading" in capsys.readouterr().err
        # With verification on, the same bytes are not the official archive: refused, nothing kept.
        cfg = DataConfig(root=str(tmp_path / "e"), download=True, verify=True, url=url)
        with pytest.raises(DataError, match="not the official archive.*by hand"):
            locate(cfg)
        assert sorted(p.name for p in (tmp_path / "e").iterdir()) == [".cifar10.lock"]
    finally:
        server.shutdown()


def test_a_cut_download_leaves_nothing_that_looks_like_data(tmp_path, cifar_root):
    payload = _archive(cifar_root)
    server, url = _serve(payload[: len(payload) // 2], len(payload))  # the connection ends halfway
    try:
        cfg = DataConfig(root=str(tmp_path / "d"), download=True, verify=False, url=url, download_timeout_s=20)
        with pytest.raises(DataError) as e:
            locate(cfg)
        assert url in str(e.value) and "localsgd_ft.fixture" in str(e.value)
        assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [".cifar10.lock"]
    finally:
        server.shutdown()
