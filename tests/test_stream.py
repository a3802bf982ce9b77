import torch

from distil.data.stream import BatchStream


def test_every_epoch_is_a_permutation_and_the_tail_is_dropped():
    stream = BatchStream(10, 3, lambda i: i, seed=0)
    epoch0 = torch.cat([stream.next() for _ in range(3)])
    assert sorted(epoch0.tolist()) != list(range(10)) and len(set(epoch0.tolist())) == 9
    first_of_epoch1 = stream.next()
    assert stream.epoch == 1 and len(first_of_epoch1) == 3


def test_state_round_trip_continues_the_same_sequence():
    a = BatchStream(20, 4, lambda i: i, seed=5)
    for _ in range(7):
        a.next()
    b = BatchStream(20, 4, lambda i: i, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(10):
        assert torch.equal(a.next(), b.next())


def test_ranks_split_each_global_batch_without_overlap():
    single = BatchStream(24, 4, lambda i: i, seed=1)
    ranks = [BatchStream(24, 2, lambda i: i, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(8):
        together = torch.cat([r.next() for r in ranks])
        assert torch.equal(together, single.next())
