"""The memory-lean per-sample store: int8 quantisation, the memory-mapped store, estimate_bytes.

CPU only, small shapes. The invariants: an int8 round trip is off by at most eps/254 per pixel;
gather/scatter touch only the crop window of the listed rows whatever the dtype; a memmap store
behaves exactly like the in-memory one and survives state_dict/load_state_dict; estimate_bytes
is what the store really holds.
"""

from __future__ import annotations

import pytest
import torch

from atas.augment import sample_crop_flip
from atas.store import DTYPES, PerSampleStore

# Largest gather error after a scatter, per stored dtype, for values in [-eps, eps].
# float16: 11-bit mantissa; bfloat16: 8-bit; int8: half a quantisation level, eps/254.
TOLERANCE = {
    "float32": lambda eps: 0.0,
    "float16": lambda eps: eps * 2.0**-11,
    "bfloat16": lambda eps: eps * 2.0**-8,
    "int8": lambda eps: eps / 254,
}


def _window_mask(cf, b: int, frame: int) -> torch.Tensor:
    """True inside sample b's crop window."""
    mask = torch.zeros(frame, frame, dtype=torch.bool)
    t, l = int(cf.top[b]), int(cf.left[b])
    mask[t : t + cf.size, l : l + cf.size] = True
    return mask


# ---------------------------------------------------------------- int8
@pytest.mark.parametrize("eps", [8 / 255, 0.3])
def test_int8_round_trip_error_at_most_eps_over_254(eps):
    torch.manual_seed(0)
    store = PerSampleStore(64, (3, 12, 12), eps, dtype="int8")
    assert store.delta.dtype == torch.int8 and store.delta.element_size() == 1
    idx = torch.randperm(64)[:32]
    cf = sample_crop_flip(32, 12, 10, True, "cpu")
    window = (torch.rand(32, 3, 10, 10) * 2 - 1) * eps
    window[0, 0, 0, :3] = torch.tensor([-eps, 0.0, eps])  # the end points and 0 are levels
    store.scatter_delta(idx, cf, window)
    back = store.gather_delta(idx, cf)
    assert back.dtype == torch.float32
    assert (back - window).abs().max().item() <= eps / 254 * (1 + 1e-5)
    assert torch.allclose(back[0, 0, 0, :3], torch.tensor([-eps, 0.0, eps]), rtol=0, atol=1e-7)
    # the stored levels are q = round(delta / eps * 127), in [-127, 127]
    assert store.delta.abs().max() <= 127
    assert store.gather_delta(idx, cf).abs().max() <= eps * (1 + 1e-6)


def test_int8_clamps_to_the_eps_ball_and_init_is_uniform():
    torch.manual_seed(1)
    eps = 0.25
    store = PerSampleStore(200, (1, 8, 8), eps, dtype="int8")
    cf = sample_crop_flip(200, 8, 8, False, "cpu")
    init = store.gather_delta(torch.arange(200), cf)
    assert init.abs().max() <= eps + 1e-7 and abs(init.abs().mean().item() - eps / 2) < 0.01
    store.scatter_delta(torch.arange(2), sample_crop_flip(2, 8, 8, False, "cpu"), torch.full((2, 1, 8, 8), 3 * eps))
    assert torch.allclose(
        store.gather_delta(torch.arange(2), sample_crop_flip(2, 8, 8, False, "cpu")), torch.full((2, 1, 8, 8), eps)
    )


# ---------------------------------------------------------------- every dtype: only the window moves
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gather_scatter_touch_only_the_window_under_each_dtype(dtype):
    torch.manual_seed(2)
    eps, frame, size = 0.1, 40, 32
    store = PerSampleStore(10, (3, frame, frame), eps, dtype=dtype)
    before = store.delta.clone()
    idx = torch.tensor([7, 2, 5])
    cf = sample_crop_flip(3, frame, size, True, "cpu")
    cf.flip[:] = torch.tensor([True, False, True])
    window = (torch.rand(3, 3, size, size) * 2 - 1) * eps
    store.scatter_delta(idx, cf, window)
    untouched = [i for i in range(10) if i not in idx.tolist()]
    assert torch.equal(store.delta[untouched], before[untouched])
    for b, i in enumerate(idx.tolist()):
        outside = ~_window_mask(cf, b, frame)
        assert torch.equal(store.delta[i][:, outside], before[i][:, outside])
    assert (store.gather_delta(idx, cf) - window).abs().max().item() <= TOLERANCE[dtype](eps) * (1 + 1e-5)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_low_resolution_storage_works_with_lean_dtypes(dtype):
    torch.manual_seed(3)
    store = PerSampleStore(4, (3, 64, 64), 0.1, dtype=dtype, storage_size=16)
    before = store.delta.clone()
    idx = torch.tensor([1, 3])
    cf = sample_crop_flip(2, 64, 56, True, "cpu")
    store.scatter_delta(idx, cf, torch.full((2, 3, 56, 56), 0.1))
    assert torch.equal(store.delta[0], before[0]) and not torch.equal(store.delta[1], before[1])
    assert store.gather_delta(idx, cf).mean() > 0.07


def test_sharded_store_refuses_an_index_it_does_not_own():
    store = PerSampleStore(10, (1, 4, 4), 0.1, dtype="int8", indices=torch.arange(10)[1::2])
    cf = sample_crop_flip(1, 4, 4, False, "cpu")
    assert store.owns(torch.tensor([3, 9])) and not store.owns(torch.tensor([3, 4]))
    with pytest.raises(IndexError):  # never silently another sample's row
        store.scatter_delta(torch.tensor([4]), cf, torch.zeros(1, 1, 4, 4))


# ---------------------------------------------------------------- dtype changes through state_dict
def test_state_dict_converts_between_dtypes():
    torch.manual_seed(4)
    eps = 8 / 255
    fp32 = PerSampleStore(30, (3, 6, 6), eps)
    int8 = PerSampleStore(30, (3, 6, 6), eps, dtype="int8")
    int8.load_state_dict(fp32.state_dict())
    every = (torch.arange(30), sample_crop_flip(30, 6, 6, False, "cpu"))
    assert (int8.gather_delta(*every) - fp32.gather_delta(*every)).abs().max() <= eps / 254 * (1 + 1e-5)
    back = PerSampleStore(30, (3, 6, 6), eps)
    back.load_state_dict(int8.state_dict())
    assert torch.equal(back.gather_delta(*every), int8.gather_delta(*every))
    copy = PerSampleStore(30, (3, 6, 6), eps, dtype="int8")
    copy.load_state_dict(int8.state_dict())
    assert torch.equal(copy.delta, int8.delta)


def test_unknown_dtype_lists_int8():
    with pytest.raises(ValueError, match="int8"):
        PerSampleStore(2, (1, 4, 4), 0.1, dtype="int4")


# ---------------------------------------------------------------- memory-mapped store
@pytest.mark.parametrize("dtype", ["float32", "int8", "bfloat16"])
def test_memmap_store_equals_in_memory_store(tmp_path, dtype):
    torch.manual_seed(5)
    eps, frame, size, n = 0.2, 12, 10, 40
    memory = PerSampleStore(n, (2, frame, frame), eps, dtype=dtype)
    mapped = PerSampleStore(n, (2, frame, frame), eps, dtype=dtype, memmap_path=tmp_path / "store.bin")
    assert (tmp_path / "store.bin").stat().st_size == memory.delta.numel() * memory.delta.element_size()
    mapped.load_state_dict(memory.state_dict())  # same start
    for step in range(5):
        idx = torch.randperm(n)[:16]
        cf = sample_crop_flip(16, frame, size, True, "cpu")
        window = (torch.rand(16, 2, size, size) * 2 - 1) * eps
        for store in (memory, mapped):
            store.scatter_delta(idx, cf, window)
            store.scatter_grad_sq_ema(idx, torch.full((16,), float(step + 1)))
        assert torch.equal(memory.gather_delta(idx, cf), mapped.gather_delta(idx, cf))
    assert torch.equal(memory.delta, mapped.delta) and torch.equal(memory.grad_sq_ema, mapped.grad_sq_ema)
    # the rows really live in the file: a fresh mapping of it reads the same bytes
    reread = torch.from_file(
        str(tmp_path / "store.bin"), shared=False, size=mapped.delta.numel(), dtype=DTYPES[dtype]
    ).view(mapped.delta.shape)
    assert torch.equal(reread, memory.delta)
    # state_dict -> checkpoint file -> a new memmap store (and an in-memory one)
    torch.save({"store": mapped.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["store"]
    restored = PerSampleStore(n, (2, frame, frame), eps, dtype=dtype, memmap_path=tmp_path / "restored.bin")
    restored.load_state_dict(state)
    plain = PerSampleStore(n, (2, frame, frame), eps, dtype=dtype)
    plain.load_state_dict(state)
    for other in (restored, plain):
        assert torch.equal(other.delta, memory.delta) and torch.equal(other.grad_sq_ema, memory.grad_sq_ema)


def test_memmap_reset_stays_in_the_ball(tmp_path):
    torch.manual_seed(6)
    store = PerSampleStore(100, (1, 8, 8), 0.1, memmap_path=tmp_path / "sub" / "store.bin")
    store.delta.zero_()
    store.reset_delta()
    assert store.delta.abs().max() <= 0.1 and store.delta.abs().mean() > 0.04
    assert "memmap" in repr(store)


def test_memmap_on_cuda_is_refused_with_advice(tmp_path):
    with pytest.raises(ValueError, match="keep the store on the CPU"):
        PerSampleStore(4, (1, 4, 4), 0.1, device="cuda", memmap_path=tmp_path / "store.bin")
    assert not (tmp_path / "store.bin").exists()


# ---------------------------------------------------------------- estimate_bytes
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("storage_size", [None, 6])
def test_estimate_bytes_matches_nbytes(dtype, storage_size):
    store = PerSampleStore(20, (3, 12, 12), 0.1, dtype=dtype, storage_size=storage_size)
    assert PerSampleStore.estimate_bytes(20, (3, 12, 12), dtype, storage_size) == store.nbytes
    shard = PerSampleStore(20, (3, 12, 12), 0.1, dtype=dtype, storage_size=storage_size, indices=torch.arange(20)[1::2])
    assert PerSampleStore.estimate_bytes(10, (3, 12, 12), dtype, storage_size) == shard.nbytes


def test_cifar10_store_sizes():
    """The official fp32 CIFAR store is 50000 x 3x40x40 x 4 bytes = 0.96 GB (+ 0.2 MB of v)."""
    fp32 = PerSampleStore.estimate_bytes(50000, (3, 40, 40), "float32")
    assert fp32 == 50000 * 3 * 40 * 40 * 4 + 50000 * 4
    assert fp32 == pytest.approx(0.96e9, rel=1e-3)
    for dtype, fraction in (("float16", 1 / 2), ("bfloat16", 1 / 2), ("int8", 1 / 4)):
        assert PerSampleStore.estimate_bytes(50000, (3, 40, 40), dtype) / fp32 == pytest.approx(fraction, rel=1e-3)
    # ImageNet as the official code stores it: 1.28M priors at 32x32 in fp16 (frame 256)
    imagenet = PerSampleStore.estimate_bytes(1_281_167, (3, 256, 256), "float16", storage_size=32)
    assert imagenet == 1_281_167 * (3 * 32 * 32 * 2 + 4)
