"""CounterNoise: Philox4x32-10 words, the per-sample streams, their distribution and a sampler run.

Every expected value comes from outside the code under test: the Random123 known-answer vectors,
the peer implementation in ``randomgen``, scipy's statistical tests and the closed-form Gaussian
denoiser. All draws are seeded, so every check is deterministic; the statistical bounds sit at about
five standard errors.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from conftest import needs_gpu

from lightning_diff.diffusion import (
    CounterNoise,
    DiscreteSchedule,
    GaussianDenoiser,
    Sampler,
    sample_ancestral,
)
from lightning_diff.diffusion.random import NoiseSource, philox4x32, randn

MASK32 = 2**32 - 1


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the draws here are many small kernels, which a second thread slows down
    many times over when the two CPUs are shared with other work."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Random123's tests/kat_vectors (github.com/DEShawResearch/random123, commit 9545ff64, lines 27-29),
# the "philox4x32 10" lines: counter (4 words), key (2 words), expected output (4 words).
RANDOM123_KAT = [
    ((0x00000000,) * 4, (0x00000000,) * 2, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def randomgen_philox(counter, key, num_words=4):
    """``num_words`` raw words of randomgen's Philox4x32 starting at the block ``counter``.

    randomgen packs both as little-endian words (``int = sum(word[i] << 32 i)``), adds one to the
    128-bit counter (with carry) before each block and returns a block's words in order 0..3, so the
    block at ``counter`` comes first when the counter is set one below it.
    """
    randomgen = pytest.importorskip("randomgen")
    packed_counter = sum(int(w) << (32 * i) for i, w in enumerate(counter))
    packed_key = int(key[0]) | (int(key[1]) << 32)
    bits = randomgen.Philox(number=4, width=32, key=packed_key, counter=(packed_counter - 1) % 2**128)
    return bits.random_raw(num_words).astype(np.uint64)


def box_muller(words: np.ndarray) -> np.ndarray:
    """Normals from consecutive Philox words in NumPy: lanes (0, 1) and (2, 3) of each block."""
    u = (words.astype(np.float64) + 0.5) / 2.0**32
    u_a, u_b = u[0::2], u[1::2]
    radius = np.sqrt(-2.0 * np.log(u_a))
    out = np.empty_like(u)
    out[0::2], out[1::2] = radius * np.cos(2 * np.pi * u_b), radius * np.sin(2 * np.pi * u_b)
    return out


@pytest.mark.parametrize("case", range(len(RANDOM123_KAT)), ids=["zeros", "ones", "pi"])
def test_philox_matches_random123_known_answers(case):
    counter, key, expected = RANDOM123_KAT[case]
    assert tuple(int(w) for w in philox4x32(counter, key)) == expected
    as_tensors = philox4x32([torch.tensor([w]) for w in counter], [torch.tensor([w]) for w in key])
    assert tuple(int(w) for w in as_tensors) == expected


def test_randomgen_packing_reproduces_the_known_answers():
    """The oracle below is read right: randomgen with this packing gives Random123's vectors."""
    for counter, key, expected in RANDOM123_KAT:
        assert tuple(int(w) for w in randomgen_philox(counter, key)) == expected


def test_philox_words_match_randomgen():
    """400 (counter, key) pairs, a quarter of their words at the edges of the 32-bit range, in one
    vectorised call against randomgen block by block."""
    rng = np.random.default_rng(11)
    words = rng.integers(0, 2**32, size=(400, 6), dtype=np.uint64)
    edges = np.array([0, 1, 2**16 - 1, 2**16, 2**31 - 1, 2**31, MASK32 - 1, MASK32], dtype=np.uint64)
    at_edge = rng.random(words.shape) < 0.25
    words[at_edge] = rng.choice(edges, size=int(at_edge.sum()))
    columns = [torch.tensor(words[:, c].astype(np.int64)) for c in range(6)]
    ours = torch.stack(philox4x32(columns[:4], columns[4:]), dim=1).numpy()
    assert ours.min() >= 0 and ours.max() <= MASK32
    theirs = np.stack([randomgen_philox(w[:4], w[4:]) for w in words])
    np.testing.assert_array_equal(ours.astype(np.uint64), theirs)


@pytest.mark.parametrize("row_shape", [(3, 4, 5), (7,), (1,)])
def test_rows_follow_the_documented_stream(row_shape):
    """Sample i's row in call d is Box-Muller of randomgen's words with key (seed, i) from the counter
    (0, d, 0, 0) on: consecutive blocks step the first counter word. Odd rows drop the last normal."""
    seed, indices = 2**32 - 3, [0, 9, 2**32 - 1, 2**32 + 9]
    noise = CounterNoise(indices, seed=seed)
    numel = math.prod(row_shape)
    blocks = (numel + 3) // 4
    for d in range(2):
        z = noise.randn((len(indices), *row_shape), dtype=torch.float64).reshape(len(indices), -1)
        for row, i in zip(z.numpy(), indices, strict=True):
            words = randomgen_philox((0, d, 0, 0), (seed, i & MASK32), 4 * blocks)
            np.testing.assert_allclose(row, box_muller(words)[:numel], rtol=1e-12, atol=1e-12)
    # Indices 2^32 apart share a stream, as documented.
    torch.testing.assert_close(z[1], z[3], rtol=0, atol=0)


def test_rows_do_not_depend_on_the_batch():
    shape = (3, 5, 7)
    whole, part = CounterNoise(range(30), seed=4), CounterNoise(range(5, 20), seed=4)
    shuffled_indices = [17, 5, 12, 19, 8]
    shuffled = CounterNoise(shuffled_indices, seed=4)
    for _ in range(2):  # calls d = 0 and d = 1
        a, b, c = whole.randn((30, *shape)), part.randn((15, *shape)), shuffled.randn((5, *shape))
        assert torch.equal(a[5:20], b)
        assert torch.equal(a[shuffled_indices], c)
    first = CounterNoise(range(4), seed=4).randn((4, 64))
    assert not torch.equal(first[0], first[1])  # another index
    assert not torch.equal(first, CounterNoise(range(4), seed=5).randn((4, 64)))  # another seed
    two_calls = CounterNoise(range(4), seed=4)
    assert not torch.equal(two_calls.randn((4, 64)), two_calls.randn((4, 64)))  # another call
    # A row's first elements do not depend on its length (the counter runs over the row).
    assert torch.equal(CounterNoise(range(4), seed=4).randn((4, 10))[:, :9], first[:, :9])


def draw_normals(num_rows=64, width=3200, seed=0):
    noise = CounterNoise(range(num_rows), seed=seed)
    return noise.randn((num_rows, width), dtype=torch.float64), noise.randn(
        (num_rows, width), dtype=torch.float64
    )


def test_draws_are_standard_normal():
    stats = pytest.importorskip("scipy.stats")
    z, _ = draw_normals()
    values = z.flatten().numpy()
    n = values.size
    assert n >= 200_000
    assert stats.kstest(values, "norm").pvalue > 1e-3
    assert abs(values.mean()) < 5 / math.sqrt(n)
    assert abs(values.var() - 1) < 5 * math.sqrt(2 / n)
    assert np.isfinite(values).all() and np.abs(values).max() < 7


def correlation(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    a, b = a.flatten(), b.flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1]), a.numel()


@pytest.mark.parametrize(
    "pair",
    [
        "neighbouring elements",
        "Box-Muller partners",
        "blocks",
        "neighbouring samples",
        "successive calls",
        "successive calls squared",
    ],
)
def test_no_correlation(pair):
    z, z_next = draw_normals()
    a, b = {
        "neighbouring elements": (z[:, :-1], z[:, 1:]),
        "Box-Muller partners": (z[:, 0::2] ** 2, z[:, 1::2] ** 2),
        "blocks": (z[:, :-4], z[:, 4:]),
        "neighbouring samples": (z[:-1], z[1:]),
        "successive calls": (z, z_next),
        "successive calls squared": (z**2, z_next**2),
    }[pair]
    r, n = correlation(a, b)
    assert abs(r) < 5 / math.sqrt(n)


def test_uniform_words_top_byte():
    """The stream's words (keys (seed, i), counters (j, 0, 0, 0)), every lane: the top byte is uniform
    over 256 bins."""
    stats = pytest.importorskip("scipy.stats")
    keys = torch.arange(256, dtype=torch.int64).unsqueeze(1)
    blocks = torch.arange(256, dtype=torch.int64).unsqueeze(0)
    words = philox4x32((blocks, 0, 0, 0), (123, keys))
    for lane in words:
        counts = torch.bincount((lane >> 24).flatten(), minlength=256).numpy()
        assert counts.size == 256
        assert stats.chisquare(counts).pvalue > 1e-3
    everything = torch.cat([w.flatten() for w in words])
    assert int(everything.min()) >= 0 and int(everything.max()) <= MASK32


def test_dtype_device_and_shape_arguments():
    noise = CounterNoise(range(3), seed=1)
    assert isinstance(noise, NoiseSource) and len(noise) == 3
    assert noise.randn((3, 4)).dtype == torch.float32
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        out = noise.randn((3, 2, 2), device="cpu", dtype=dtype)
        assert out.dtype == dtype and out.shape == (3, 2, 2) and out.device.type == "cpu"
    via_module = randn((3, 5), CounterNoise(range(3), seed=1), device="cpu", dtype=torch.float64)
    direct = CounterNoise(range(3), seed=1).randn((3, 5), dtype=torch.float64)
    assert torch.equal(via_module, direct)
    # Casting happens after the float64 draw: float32 is the float64 draw rounded.
    assert torch.equal(CounterNoise(range(3), seed=1).randn((3, 5)), direct.float())
    with pytest.raises(ValueError, match="batch of 4 but 3"):
        noise.randn((4, 2))
    assert CounterNoise([], seed=1).randn((0, 3)).shape == (0, 3)


def test_seed_must_fit_32_bits():
    CounterNoise(range(2), seed=MASK32).randn((2, 3))
    for seed in (2**32, 2**40, -1):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\)"):
            CounterNoise(range(2), seed=seed)


@pytest.mark.gpu
@needs_gpu
def test_words_are_bit_identical_on_cuda():
    keys = torch.tensor([0, 1, 2**31, MASK32], dtype=torch.int64).unsqueeze(1)
    blocks = torch.tensor([0, 5, MASK32 - 1, MASK32], dtype=torch.int64).unsqueeze(0)
    on_cpu = philox4x32((blocks, 3, MASK32, 7), (MASK32, keys))
    on_gpu = philox4x32((blocks.cuda(), 3, MASK32, 7), (MASK32, keys.cuda()))
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert torch.equal(a, b.cpu())
    cpu_noise = CounterNoise(range(8), seed=3).randn((8, 3, 4), dtype=torch.float64)
    gpu_noise = CounterNoise(range(8), seed=3, device="cuda").randn((8, 3, 4), dtype=torch.float64)
    torch.testing.assert_close(gpu_noise.cpu(), cpu_noise, rtol=1e-14, atol=1e-14)


# The 2-D target and tolerances of tests/test_samplers.py.
MEAN = torch.tensor([1.0, -0.5])
COV = torch.tensor([[1.0, 0.6], [0.6, 0.8]])


def test_ancestral_sampler_reproduces_gaussian_with_counter_noise():
    n, steps = 20000, 1000
    sampler = Sampler(functools.partial(sample_ancestral, variance="posterior"), num_steps=steps)
    x, nfe = sampler(GaussianDenoiser(MEAN, COV), DiscreteSchedule(), (n, 2), CounterNoise(range(n), seed=0))
    assert nfe == steps
    x = x.double()
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x.mean(0), MEAN.double(), atol=0.04, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), COV.double(), atol=0.04, rtol=0)


def test_sampler_output_does_not_depend_on_batching():
    schedule, denoiser = DiscreteSchedule(), GaussianDenoiser(MEAN, COV)
    sampler = Sampler(functools.partial(sample_ancestral, variance="posterior"), num_steps=50)
    whole, _ = sampler(denoiser, schedule, (10, 2), CounterNoise(range(10), seed=7))
    halves = [
        sampler(denoiser, schedule, (5, 2), CounterNoise(r, seed=7))[0] for r in (range(5), range(5, 10))
    ]
    assert torch.equal(torch.cat(halves), whole)
    other, _ = sampler(denoiser, schedule, (10, 2), CounterNoise(range(10), seed=8))
    assert not torch.allclose(other, whole)
