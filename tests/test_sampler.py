"""Identity and random samplers: batch composition and sharding across ranks."""
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from datasets import RandomIdentitySampler, ShardedRandomSampler
from datasets.sampler import shard_batches
from utils.errors import UserError

# 10 identities; identity 9 has a single sample, identity 8 three, the others 6 or 7
PIDS = [pid for pid in range(8) for _ in range(6 + pid % 2)] + [8, 8, 8, 9]


def _chunks(seq, size):
    return [list(seq[i : i + size]) for i in range(0, len(seq), size)]


def _loader_batches(sampler, batch_size, n):
    loader = DataLoader(list(range(n)), batch_size=batch_size, sampler=sampler)
    return [b.tolist() for b in loader]


def test_identity_batches_have_p_ids_times_k():
    sampler = RandomIdentitySampler(PIDS, batch_size=8, num_instances=2, seed=3)
    order = list(sampler)
    assert len(order) == len(sampler) and len(order) % 8 == 0 and len(order) > 0
    for batch in _chunks(order, 8):
        pids = [PIDS[i] for i in batch]
        assert Counter(pids) == Counter({pid: 2 for pid in set(pids)}) and len(set(pids)) == 4
        for group in _chunks(pids, 2):  # each identity's samples are contiguous
            assert group[0] == group[1]
    # identity 9 (one sample) is re-drawn with replacement when it appears
    nine = [i for i in order if PIDS[i] == 9]
    assert len(nine) in (0, 2) and set(nine) <= {len(PIDS) - 1}


def test_identity_sampler_covers_groups_and_is_seeded():
    sampler = RandomIdentitySampler(PIDS, batch_size=4, num_instances=2, seed=0)
    order = list(sampler)
    counts = Counter(PIDS[i] for i in order)
    # groups of 2 per identity: 3 for 6-7 samples, 1 for 3 samples, 1 (padded) for 1 sample; at most one
    # batch's worth of groups is left over when fewer than P=2 identities remain
    full = {pid: 6 if pid < 8 else 2 for pid in range(10)}
    assert all(counts[pid] <= full[pid] for pid in full)
    assert sum(full.values()) - sum(counts.values()) <= 2 * 2
    assert order == list(RandomIdentitySampler(PIDS, batch_size=4, num_instances=2, seed=0))
    assert order != list(RandomIdentitySampler(PIDS, batch_size=4, num_instances=2, seed=1))
    sampler.set_epoch(1)
    assert list(sampler) != order
    sampler.set_epoch(0)
    assert list(sampler) == order


@pytest.mark.parametrize("replicas", [2, 4])
def test_identity_sharding_matches_single_process(replicas):
    batch = 8
    single = RandomIdentitySampler(PIDS, batch, 2, seed=7)
    shards = [RandomIdentitySampler(PIDS, batch, 2, num_replicas=replicas, rank=r, seed=7) for r in range(replicas)]
    for epoch in (0, 1):
        for s in (single, *shards):
            s.set_epoch(epoch)
        expected = _loader_batches(single, batch, len(PIDS))
        per_rank = [_loader_batches(s, batch // replicas, len(PIDS)) for s in shards]
        assert all(len(batches) == len(expected) for batches in per_rank)
        for step, global_batch in enumerate(expected):
            # rank r holds the r-th contiguous slice of the global batch
            assert sum((per_rank[r][step] for r in range(replicas)), []) == global_batch


def test_random_sampler_single_process_is_a_permutation():
    sampler = ShardedRandomSampler(23, batch_size=5, seed=4)
    order = list(sampler)
    assert sorted(order) == list(range(23)) and len(sampler) == 23
    assert order == list(ShardedRandomSampler(23, batch_size=5, seed=4))
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(23)) and list(sampler) != order


@pytest.mark.parametrize("n, batch, replicas", [(23, 6, 2), (24, 6, 3), (30, 8, 4), (40, 8, 2)])
def test_random_sharding_union_is_every_sample_once(n, batch, replicas):
    single = ShardedRandomSampler(n, batch, seed=2)
    shards = [ShardedRandomSampler(n, batch, num_replicas=replicas, rank=r, seed=2) for r in range(replicas)]
    expected = _loader_batches(single, batch, n)
    per_rank = [_loader_batches(s, batch // replicas, n) for s in shards]
    assert all(len(b) == len(expected) for b in per_rank)  # same iterations as one process
    for step, global_batch in enumerate(expected):
        union = sum((per_rank[r][step] for r in range(replicas)), [])
        assert union == global_batch  # disjoint slices whose union is the single-process batch
    assert sorted(i for b in per_rank for batch_ in b for i in batch_) == list(range(n))


def test_random_sharding_tiny_tail_is_padded():
    # 25 = 3 * 8 + 1: the last global batch has one sample for 4 ranks
    shards = [ShardedRandomSampler(25, 8, num_replicas=4, rank=r, seed=0) for r in range(4)]
    per_rank = [_loader_batches(s, 2, 25) for s in shards]
    assert [len(b) for b in per_rank] == [4, 4, 4, 4]
    seen = Counter(i for b in per_rank for batch_ in b for i in batch_)
    assert set(seen) == set(range(25)) and sum(seen.values()) == 28


def test_shard_batches_by_hand():
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 10]
    assert shard_batches(order, 4, 2, 0) == [9, 8, 5, 4, 1, 0]
    assert shard_batches(order, 4, 2, 1) == [7, 6, 3, 2, 10]
    assert shard_batches(order, 4, 1, 0) == order


def test_sampler_errors():
    with pytest.raises(UserError, match="multiple of --num_instance 4"):
        RandomIdentitySampler(PIDS, batch_size=10, num_instances=4)
    with pytest.raises(UserError, match="multiple of the world size 3"):
        ShardedRandomSampler(10, batch_size=8, num_replicas=3, rank=0)
    with pytest.raises(UserError, match="rank must be in"):
        ShardedRandomSampler(10, batch_size=8, num_replicas=2, rank=2)
    with pytest.raises(UserError, match="only 10"):
        RandomIdentitySampler(PIDS, batch_size=44, num_instances=2)


def test_epoch_seed_changes_identity_order_on_all_ranks_alike():
    a = RandomIdentitySampler(PIDS, 8, 2, num_replicas=2, rank=0, seed=5)
    b = RandomIdentitySampler(PIDS, 8, 2, num_replicas=2, rank=1, seed=5)
    first = (list(a), list(b))
    a.set_epoch(3)
    b.set_epoch(3)
    assert (list(a), list(b)) != first
    assert torch.tensor(list(a)).numel() == len(a) and len(a) == len(b)
