"""B's row blocks (`blocks`): the per-block sums that replace the whole B give what the whole
matrix gives (objective.code_stats, codes.code_linear + codes.dcc), on 3 gloo processes with
uneven blocks; checksums do not depend on the split; a changed block is caught; checkpoints
written in one split are read in another."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _gloo import run_workers

from dadh_dist import blocks, codes
from dadh_dist import checkpoint as ckpt
from dadh_dist import objective as obj
from dadh_dist.distributed import LocalCollectives, ReplicaMismatch, even_split

N, K, M, C = 50, 12, 9, 4  # 3 blocks of 17, 17, 16 rows


def _data(single: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B = torch.where(torch.rand(N, K, generator=g) < 0.5, -1, 1).to(torch.int8)
    if single:
        Y = torch.eye(C)[torch.randint(0, C, (N,), generator=g)]
    else:  # label sets, some empty
        Y = (torch.rand(N, C, generator=g) < 0.35).float()
    omega = torch.randperm(N, generator=g)[:M]
    F = torch.randn(M, K, generator=g)
    G = torch.randn(M, K, generator=g)
    return B, Y, omega, F, G


def _whole(single: bool, kind: str):
    """What one worker holding all of B computes."""
    B, Y, omega, F, G = _data(single)
    sim = obj.make_similarity(kind, Y[omega], Y)
    stats = obj.code_stats(B, sim, Y[omega], Y)
    Q = codes.code_linear(slice(0, N), Y, omega, F, G, sim, gamma=3.0, eta=0.5, bits=K,
                          chunk_rows=7)
    B_new = codes.dcc(B, codes.code_hessian(F, G), Q, 0.5, 2)
    return sim, stats, B_new


def _check_block(c, single: bool, kind: str):
    B, Y, omega, F, G = _data(single)
    rows = blocks.block_rows(N, c)
    block = blocks.open_block(c, B[rows], rows, N, Y[rows])
    assert block.single == single
    stats, sim = blocks.code_stats(c, block, kind, Y[omega], Y[rows], chunk_rows=5)
    want_sim, want, want_B = _whole(single, kind)
    assert sim.r == pytest.approx(want_sim.r, rel=1e-12)
    assert torch.equal(stats.BtB, want.BtB) and stats.n == N
    torch.testing.assert_close(stats.SB, want.SB, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(stats.S_sq, want.S_sq, rtol=1e-6, atol=1e-5)
    assert torch.equal(blocks.gather_rows(c, block, omega), B[omega])
    Y8 = Y.to(torch.uint8)
    assert torch.equal(blocks.gather_label_rows(c, block, Y8[rows], omega), Y8[omega])
    assert blocks.checksum(c, block) == blocks.checksum(LocalCollectives(), _one_block(B, Y))
    new = blocks.solve(block, F, G, omega, Y[omega], Y[rows], sim, gamma=3.0, eta=0.5, bits=K,
                       sweeps=2, chunk_rows=7)
    assert torch.equal(new, want_B[rows])
    metrics = blocks.update(c, block, new)
    assert metrics["codes/flipped"] == float((want_B != B).sum()) / (N * K)
    assert metrics["codes/bit_balance"] == pytest.approx(
        float(want_B.double().mean(0).abs().mean()), rel=1e-12)
    # hashed a few rows at a time, a block's share of the checksum is the same
    assert blocks._partial_checksum(block, chunk_rows=4) == block.partial
    assert metrics["codes/checksum"] == blocks.update(LocalCollectives(), _one_block(B, Y),
                                                      want_B)["codes/checksum"]
    count, exact = blocks.distinct_codes(c, block)
    assert exact and count == np.unique(want_B.numpy(), axis=0).shape[0]


def _one_block(B, Y):
    return blocks.open_block(LocalCollectives(), B, slice(0, N), N, Y)


def _worker(rank, world):
    from dadh_dist.distributed import TorchCollectives

    c = TorchCollectives()
    for single, kind in [(True, "soft"), (False, "soft"), (True, "pm1")]:
        _check_block(c, single, kind)
    # a bit of rank 1's block flipped after its code step: every rank stops, naming rank 1
    B, Y, *_ = _data(True)
    rows = blocks.block_rows(N, c)
    block = blocks.open_block(c, B[rows], rows, N, Y[rows])
    blocks.verify(c, block, "while intact")
    if rank == 1:
        block.B[3, 5] *= -1
    with pytest.raises(ReplicaMismatch, match=r"worker\(s\) \[1\] changed"):
        blocks.verify(c, block, "after the flip")


def test_blocks_on_three_workers_equal_the_whole_matrix():
    run_workers(_worker, 3, timeout_s=60)


def test_checkpoint_blocks_are_read_back_in_another_split(tmp_path):
    B = torch.where(torch.rand(N, K) < 0.5, -1, 1).to(torch.int8)
    listed = []
    for r in range(3):
        part = even_split(N, 3, r)
        name, sha = ckpt.save_block(tmp_path, part.start, part.stop, B[part].numpy())
        listed.append((part.start, part.stop, name, sha))
    ckpt.save(tmp_path, {"t": 1}, "", "fp", blocks=listed, shape=(N, K))
    state, manifest = ckpt.load(tmp_path)
    assert torch.equal(state["B"], B)
    for world in (1, 2, 4, 60):  # 60 workers: some hold no row at all
        for r in range(world):
            part = even_split(N, world, r)
            got = ckpt.load_rows(tmp_path, manifest, None, part.start, part.stop)
            assert torch.equal(got, B[part])
    with pytest.raises(ValueError, match="cover rows"):
        ckpt.save(tmp_path / "short", {"t": 1}, "", "fp", blocks=listed[:2], shape=(N, K))


def test_omega_above_the_permutation_limit_is_drawn_in_o_of_m(monkeypatch):
    from dadh_dist import loop

    # at and below the limit: the head of one permutation of all n, as always
    gen = torch.Generator().manual_seed(loop.seed_for(5, 1, 2))
    assert torch.equal(loop.sample_omega(5, 2, 1000, 30), torch.randperm(1000, generator=gen)[:30])
    # n = 2^31 (a 16 GiB permutation): m distinct indices in range, the same for the same (seed, t)
    big = loop.sample_omega(5, 2, 1 << 31, 12_000)
    assert big.dtype == torch.int64 and big.unique().numel() == 12_000
    assert 0 <= int(big.min()) and int(big.max()) < 1 << 31 and int(big.max()) > 1 << 30
    assert torch.equal(big, loop.sample_omega(5, 2, 1 << 31, 12_000))
    assert not torch.equal(big, loop.sample_omega(5, 3, 1 << 31, 12_000))
    # uniform: every one of 1,000 rows drawn about equally often over 400 draws of 300
    monkeypatch.setattr(loop, "PERMUTE_MAX", 100)
    counts = torch.zeros(1000)
    for t in range(400):
        omega = loop.sample_omega(0, t, 1000, 300)
        assert omega.unique().numel() == 300
        counts[omega] += 1
    expected = 400 * 300 / 1000
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 999 + 5 * (2 * 999) ** 0.5, chi2  # 999 degrees of freedom
    # and in random order: the first position is not biased towards the large values
    firsts = torch.stack([loop.sample_omega(0, t, 1000, 300)[0] for t in range(400)]).double()
    assert abs(float(firsts.mean()) - 499.5) < 4 * 289 / 400 ** 0.5
