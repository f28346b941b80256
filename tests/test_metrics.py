"""Tests of utils.metrics against a per-query reference written from the definitions, and hand-worked cases."""
import contextlib
import logging
import math

import numpy
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from utils.errors import UserError
from utils.metrics import Evaluator, evaluate, format_results, rank, rank_features
import utils.ranking as ranking
from utils.ranking import METHODS, _nonzero_sparse, auto_chunk_size


@pytest.fixture(autouse=True, params=["compiled", "tensor"])
def engine(request):
    """Every test runs with both engines of the fast path (tests of one engine's internals choose theirs)."""
    previous = ranking.set_fast_engine(request.param)
    yield request.param
    ranking.set_fast_engine(previous)


tensor_engine_only = pytest.mark.parametrize("engine", ["tensor"], indirect=True)


# ----------------------------------------------------------------------------------------------------
# Reference: plain Python, one query at a time, straight from the definitions
# ----------------------------------------------------------------------------------------------------
def reference_rank(similarity, q_pids, g_pids, max_rank, rerank=None, rerank_topk=0):
    """CMC (percent, all queries), mAP and mINP (percent, queries with a correct item), top indices.

    Gallery order: score descending, ties by lower gallery index. With ``rerank(query, items) -> scores``,
    the first ``rerank_topk`` items are re-sorted by their new scores (ties keep their order) and put first.
    """
    sim = similarity.double().tolist()
    q_pids, g_pids = list(map(int, q_pids)), list(map(int, g_pids))
    num_gallery = len(g_pids)
    cmc = [0.0] * max_rank
    aps, inps, tops = [], [], []
    for query, (row, pid) in enumerate(zip(sim, q_pids)):
        order = sorted(range(num_gallery), key=lambda j: (-row[j], j))
        if rerank is not None and rerank_topk > 0:
            head = order[:rerank_topk]
            new = [float(x) for x in rerank(query, head)]
            order = [head[i] for i in sorted(range(len(head)), key=lambda i: (-new[i], i))] + order[rerank_topk:]
        tops.append(order[:max_rank])
        correct_ranks = [r + 1 for r, j in enumerate(order) if g_pids[j] == pid]
        if not correct_ranks:
            continue
        for k in range(max_rank):
            if correct_ranks[0] <= k + 1:
                cmc[k] += 1
        aps.append(sum((m + 1) / r for m, r in enumerate(correct_ranks)) / len(correct_ranks))
        inps.append(len(correct_ranks) / correct_ranks[-1])
    num_queries = len(q_pids)
    return (
        [100.0 * c / num_queries for c in cmc],
        100.0 * sum(aps) / len(aps),
        100.0 * sum(inps) / len(inps),
        tops,
    )


def assert_matches_reference(similarity, q_pids, g_pids, max_rank=10, **kwargs):
    cmc, mAP, mINP, indices = rank(similarity, q_pids, g_pids, max_rank, **kwargs)
    ref_cmc, ref_mAP, ref_mINP, ref_tops = reference_rank(similarity, q_pids, g_pids, max_rank)
    assert cmc.shape == (max_rank,)
    assert cmc.tolist() == pytest.approx(ref_cmc, abs=1e-4)
    assert float(mAP) == pytest.approx(ref_mAP, abs=1e-4)
    assert float(mINP) == pytest.approx(ref_mINP, abs=1e-4)
    width = min(max_rank, similarity.shape[1])
    assert indices.dtype == torch.int64 and indices.shape == (similarity.shape[0], width)
    assert indices.tolist() == [top[:width] for top in ref_tops]


def random_case(seed, num_queries, num_gallery, num_ids, decimals=None, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    g_pids = torch.randint(0, num_ids, (num_gallery,), generator=gen)
    q_pids = g_pids[torch.randint(0, num_gallery, (num_queries,), generator=gen)]  # every query has a match
    similarity = torch.randn(num_queries, num_gallery, generator=gen, dtype=torch.float64)
    # correct items score a little higher on average, as with a real model
    similarity += 0.8 * (q_pids[:, None] == g_pids[None, :])
    if decimals is not None:  # round to that many decimal digits: exact ties
        similarity = torch.round(similarity, decimals=decimals)
    return similarity.to(dtype), q_pids, g_pids


# ----------------------------------------------------------------------------------------------------
# rank(): hand-worked examples
# ----------------------------------------------------------------------------------------------------
def test_rank_hand_computed_two_queries():
    # query 0 (pid 1): order 0(p2) 2(p1) 4(p1) 3(p2) 1(p1) -> correct at ranks 2, 3, 5
    #   AP = (1/2 + 2/3 + 3/5) / 3 = 0.588889, INP = 3/5 = 0.6, first hit at rank 2
    # query 1 (pid 2): items 1 and 2 tie at 0.7, lower index first: order 1 2 4 0 3 -> correct at 4, 5
    #   AP = (1/4 + 2/5) / 2 = 0.325, INP = 2/5 = 0.4, first hit at rank 4
    similarity = torch.tensor([[0.9, 0.1, 0.8, 0.3, 0.5], [0.2, 0.7, 0.7, 0.1, 0.6]])
    q_pids = torch.tensor([1, 2])
    g_pids = torch.tensor([2, 1, 1, 2, 1])
    cmc, mAP, mINP, indices = rank(similarity, q_pids, g_pids, max_rank=5)
    assert cmc.tolist() == pytest.approx([0.0, 50.0, 50.0, 100.0, 100.0])
    assert float(mAP) == pytest.approx(100 * (((1 / 2 + 2 / 3 + 3 / 5) / 3) + 0.325) / 2, abs=1e-5)
    assert float(mAP) == pytest.approx(45.694444, abs=1e-4)
    assert float(mINP) == pytest.approx(50.0, abs=1e-5)
    assert indices.tolist() == [[0, 2, 4, 3, 1], [1, 2, 4, 0, 3]]


def test_rank_ties_go_to_lower_gallery_index():
    # all three scores equal: order 0 1 2
    similarity = torch.full((3, 3), 0.5)
    g_pids = torch.tensor([0, 1, 1])
    q_pids = torch.tensor([1, 0, 1])
    cmc, mAP, mINP, indices = rank(similarity, q_pids, g_pids, max_rank=3)
    # query 0 and 2 (pid 1): correct at ranks 2, 3 -> AP = (1/2 + 2/3) / 2, INP = 2/3
    # query 1 (pid 0): correct at rank 1 -> AP = 1, INP = 1
    assert float(mAP) == pytest.approx(100 * (2 * (1 / 2 + 2 / 3) / 2 + 1) / 3, abs=1e-5)
    assert float(mINP) == pytest.approx(100 * (2 * (2 / 3) + 1) / 3, abs=1e-5)
    assert cmc.tolist() == pytest.approx([100 / 3, 100.0, 100.0])
    assert indices.tolist() == [[0, 1, 2]] * 3


def test_rank_returns_cpu_tensors_like_irra():
    similarity, q_pids, g_pids = random_case(0, 7, 30, 4)
    cmc, mAP, mINP, indices = rank(similarity, q_pids.tolist(), g_pids.numpy(), max_rank=numpy.int64(10))
    for value in (cmc, mAP, mINP, indices):
        assert isinstance(value, torch.Tensor) and value.device.type == "cpu"
    assert cmc.numpy().shape == (10,) and mAP.numpy().shape == () and mINP.numpy().shape == ()


# ----------------------------------------------------------------------------------------------------
# rank(): equality with the reference on random data
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "seed, num_queries, num_gallery, num_ids, decimals, chunk_size, max_rank",
    [
        (1, 37, 300, 12, None, 8, 10),  # chunks that do not divide Q
        (2, 23, 1500, 3, None, 5, 10),  # hundreds of correct items per query
        (3, 41, 400, 9, 1, 7, 10),  # scores rounded: many exact ties
        (4, 19, 250, 40, 0, 4, 25),  # heavy ties; max_rank above most correct-item counts
        (5, 11, 7, 3, None, 3, 10),  # gallery smaller than max_rank
        (6, 30, 90, 30, None, None, 5),  # automatic chunk size
        (7, 16, 64, 2, 0, 16, 10),  # integer-valued scores: huge tie groups
    ],
)
def test_rank_equals_reference(seed, num_queries, num_gallery, num_ids, decimals, chunk_size, max_rank):
    similarity, q_pids, g_pids = random_case(seed, num_queries, num_gallery, num_ids, decimals)
    assert_matches_reference(similarity, q_pids, g_pids, max_rank, chunk_size=chunk_size)


def random_shape_case(seed, max_queries, max_gallery, max_ids):
    """``random_case`` with random sizes and id count, rounded to 0, 1, 2 decimals or not (by ``seed``);
    also returns the generator, for further random choices."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [int(torch.randint(1, top, (), generator=gen)) for top in (max_queries, max_gallery, max_ids)]
    return (*random_case(seed + 1, *sizes, [None, 0, 1, 2][seed % 4]), gen)


@pytest.mark.parametrize("seed", range(8))
def test_rank_equals_reference_random_shapes(seed):
    # random sizes, id counts, rounding, chunking and max_rank; a few -inf scores
    similarity, q_pids, g_pids, gen = random_shape_case(100 + seed, 30, 900, 25)
    similarity[torch.rand(similarity.shape, generator=gen) < 0.01] = float("-inf")
    max_rank = int(torch.randint(1, 20, (), generator=gen))
    chunk_size = int(torch.randint(1, 12, (), generator=gen))
    assert_matches_reference(similarity, q_pids, g_pids, max_rank, chunk_size=chunk_size)


def test_rank_float64_and_float16_inputs():
    similarity, q_pids, g_pids = random_case(8, 17, 200, 6, dtype=torch.float64)
    assert_matches_reference(similarity, q_pids, g_pids, chunk_size=6)
    half = similarity.half()  # compared after exact widening to float32; rounding creates ties
    cmc, mAP, mINP, indices = rank(half, q_pids, g_pids, chunk_size=5)
    ref_cmc, ref_mAP, ref_mINP, ref_tops = reference_rank(half.float(), q_pids, g_pids, 10)
    assert float(mAP) == pytest.approx(ref_mAP, abs=1e-4) and float(mINP) == pytest.approx(ref_mINP, abs=1e-4)
    assert indices.tolist() == ref_tops


def test_rank_correct_item_ranked_last_and_infinite_scores():
    similarity, q_pids, g_pids = random_case(9, 12, 150, 5)
    # query 0: exactly one correct item, scored below everything else
    lone = 99
    g_pids[17], q_pids[0] = lone, lone
    similarity[0, 17] = similarity[0].min() - 1.0
    # infinite scores: a correct item at -inf, a wrong one at +inf, a whole row of -inf
    similarity[1, (g_pids == q_pids[1]).nonzero()[0, 0]] = float("-inf")
    similarity[2, (g_pids != q_pids[2]).nonzero()[0, 0]] = float("inf")
    similarity[3] = float("-inf")
    assert_matches_reference(similarity, q_pids, g_pids, chunk_size=4)
    _, mAP_alone, mINP_alone, _ = rank(similarity[:1], q_pids[:1], g_pids)
    assert float(mAP_alone) == pytest.approx(100 / 150) and float(mINP_alone) == pytest.approx(100 / 150)


def test_rank_non_contiguous_similarity():
    similarity, q_pids, g_pids = random_case(10, 60, 25, 5)
    transposed = similarity.t()  # [25, 60] view with strides (1, 60)
    assert not transposed.is_contiguous()
    before = transposed.clone()
    assert_matches_reference(transposed, g_pids, q_pids, chunk_size=7)  # gallery items as queries
    assert torch.equal(transposed, before)  # the input is left untouched


def test_rank_does_not_depend_on_chunk_size():
    similarity, q_pids, g_pids = random_case(11, 30, 500, 20, decimals=3)
    reference = rank(similarity, q_pids, g_pids, chunk_size=30)
    for chunk_size in (1, 3, 17, None):
        result = rank(similarity, q_pids, g_pids, chunk_size=chunk_size)
        for got, expected in zip(result, reference):
            assert torch.equal(got, expected)


@tensor_engine_only
def test_rank_resolves_blocks_early_when_too_many_items_are_gathered(monkeypatch):
    import utils.ranking as metrics

    # one row per block and a budget of 40 gathered items: every block is resolved on its own
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(metrics, "_MAX_CANDIDATES", 40)
    calls = []
    original = metrics._ranks_of_correct

    def counting(scans, *args):
        calls.append(len(scans))
        return original(scans, *args)

    monkeypatch.setattr(metrics, "_ranks_of_correct", counting)
    similarity, q_pids, g_pids = random_case(19, 21, 600, 6, decimals=1)
    assert_matches_reference(similarity, q_pids, g_pids, chunk_size=21)
    assert calls == [1] * 21  # each row resolved as soon as it was scanned


def test_rank_without_map_returns_cmc_and_indices():
    similarity, q_pids, g_pids = random_case(12, 20, 120, 7, decimals=1)
    cmc, mAP, mINP, indices = rank(similarity, q_pids, g_pids, max_rank=10)
    cmc_only, indices_only = rank(similarity, q_pids, g_pids, max_rank=10, get_mAP=False)
    assert torch.equal(cmc_only, cmc) and torch.equal(indices_only, indices)


def test_queries_without_correct_item_are_misses_and_excluded_from_map(caplog):
    similarity, q_pids, g_pids = random_case(13, 10, 80, 4)
    q_pids = q_pids.clone()
    q_pids[[2, 5]] = 1000  # no gallery item has this id
    with caplog.at_level(logging.WARNING, logger="utils.ranking"):
        cmc, mAP, mINP, _ = rank(similarity, q_pids, g_pids, chunk_size=3)
    assert "2 of 10 queries have no correct gallery item" in caplog.text
    keep = torch.tensor([i not in (2, 5) for i in range(10)])
    ref_cmc, ref_mAP, ref_mINP, _ = reference_rank(similarity[keep], q_pids[keep], g_pids, 10)
    assert float(mAP) == pytest.approx(ref_mAP, abs=1e-4)
    assert float(mINP) == pytest.approx(ref_mINP, abs=1e-4)
    # CMC counts all 10 queries: the 8 valid ones' hits over 10
    assert cmc.tolist() == pytest.approx([c * 8 / 10 for c in ref_cmc], abs=1e-4)


@pytest.mark.parametrize("density", [0.0, 0.001, 0.01, 0.5, 1.0])
def test_nonzero_sparse_matches_nonzero(density):
    gen = torch.Generator().manual_seed(14)
    mask = torch.rand(64 * 1001, generator=gen) < density
    mask[-1] = density > 0
    assert torch.equal(_nonzero_sparse(mask), mask.nonzero().squeeze(1))
    assert torch.equal(_nonzero_sparse(mask.to(torch.uint8)), mask.nonzero().squeeze(1))


def test_auto_chunk_size_follows_budget():
    assert auto_chunk_size(1000, bytes_per_element=100, budget_bytes=10**6) == 10
    # 96 bytes per correct item: 1000 * 100 + 50 * 96 = 104800 bytes per row
    assert auto_chunk_size(1000, max_correct=50, bytes_per_element=100, budget_bytes=10**6) == 9
    assert auto_chunk_size(10**9, bytes_per_element=100, budget_bytes=10**6) == 1


# ----------------------------------------------------------------------------------------------------
# Features path, i2t, evaluate(), format_results()
# ----------------------------------------------------------------------------------------------------
def random_features(seed, num_texts=40, num_images=30, num_ids=8, dim=16):
    gen = torch.Generator().manual_seed(seed)
    g_pids = torch.arange(num_images) % num_ids
    q_pids = g_pids[torch.randint(0, num_images, (num_texts,), generator=gen)]
    centres = torch.randn(num_ids, dim, generator=gen)
    image_feats = centres[g_pids] + 1.5 * torch.randn(num_images, dim, generator=gen)
    text_feats = centres[q_pids] + 1.5 * torch.randn(num_texts, dim, generator=gen)
    return text_feats, image_feats, q_pids, g_pids


def test_rank_features_equals_similarity_path():
    text_feats, image_feats, q_pids, g_pids = random_features(15)
    text_feats, image_feats = F.normalize(text_feats, dim=1), F.normalize(image_feats, dim=1)
    expected = rank(text_feats @ image_feats.t(), q_pids, g_pids)
    got = rank_features(text_feats, image_feats, q_pids, g_pids, chunk_size=9)
    for value, reference in zip(got, expected):
        assert torch.allclose(value.float(), reference.float(), atol=1e-4)
    assert torch.equal(got[3], expected[3])


def test_rank_features_normalize_flag_gives_cosine_ranking():
    text_feats, image_feats, q_pids, g_pids = random_features(16)
    cosine = F.normalize(text_feats, dim=1) @ F.normalize(image_feats, dim=1).t()
    _, mAP, mINP, indices = rank_features(text_feats * 7.0, image_feats, q_pids, g_pids, normalize=True)
    _, ref_mAP, ref_mINP, ref_tops = reference_rank(cosine, q_pids, g_pids, 10)
    assert float(mAP) == pytest.approx(ref_mAP, abs=1e-4) and float(mINP) == pytest.approx(ref_mINP, abs=1e-4)
    assert indices.tolist() == ref_tops


def test_evaluate_i2t_equals_rank_on_transposed_similarity():
    text_feats, image_feats, q_pids, g_pids = random_features(17)
    results = evaluate(text_feats, image_feats, q_pids, g_pids, i2t=True)
    similarity = F.normalize(text_feats, dim=1) @ F.normalize(image_feats, dim=1).t()
    for task, (sim, queries, gallery) in {"t2i": (similarity, q_pids, g_pids),
                                          "i2t": (similarity.t(), g_pids, q_pids)}.items():
        cmc, mAP, mINP, _ = rank(sim, queries, gallery)
        expected = {"R1": cmc[0], "R5": cmc[4], "R10": cmc[9], "mAP": mAP, "mINP": mINP}
        assert set(results[task]) == set(expected)
        for key, value in expected.items():
            assert isinstance(results[task][key], float)
            assert results[task][key] == pytest.approx(float(value), abs=1e-4)


def test_format_results_table():
    table = format_results({"t2i": {"R1": 63.456789, "R5": 80.0, "R10": 85.5, "mAP": 38.06, "mINP": 7.9},
                            "i2t": {"R1": 1.0, "R5": 2.0, "R10": 3.0, "mAP": 4.0, "mINP": 5.0}})
    lines = table.splitlines()
    assert [cell.strip() for cell in lines[1].strip("|").split("|")] == ["task", "R1", "R5", "R10", "mAP", "mINP"]
    assert [cell.strip() for cell in lines[3].strip("|").split("|")] == [
        "t2i", "63.457", "80.000", "85.500", "38.060", "7.900"]
    assert lines[4].split("|")[1].strip() == "i2t"


# ----------------------------------------------------------------------------------------------------
# Evaluator with a fake model
# ----------------------------------------------------------------------------------------------------
class OneHotModel(torch.nn.Module):
    """Captions and images encode to the one-hot vector of an identity stored in their first value."""

    def __init__(self, num_ids):
        super().__init__()
        self.num_ids = num_ids
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.head = torch.nn.Dropout(0.5)
        self.modes_seen = []

    def encode_text(self, caption_ids):
        self.modes_seen.append(self.training)
        assert torch.is_inference_mode_enabled()
        return F.one_hot(caption_ids[:, 0], self.num_ids).float() * self.scale

    def encode_image(self, images):
        self.modes_seen.append(self.head.training)
        return F.one_hot(images[:, 0, 0, 0].long(), self.num_ids).float() * self.scale


def make_loaders(batch_size=3):
    num_ids = 4
    g_pids = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    images = torch.zeros(len(g_pids), 3, 2, 2)
    images[:, 0, 0, 0] = g_pids.float()
    q_pids = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    encoded = q_pids.clone()
    encoded[[1, 6]] = torch.tensor([2, 0])  # two captions describe the wrong identity: R1 = 6/8
    caption_ids = torch.stack([encoded, torch.full_like(encoded, 7)], dim=1)  # [Q, L=2]
    img_loader = DataLoader(TensorDataset(g_pids, images), batch_size=batch_size)
    txt_loader = DataLoader(TensorDataset(q_pids, caption_ids), batch_size=batch_size)
    return img_loader, txt_loader, num_ids


def test_evaluator_returns_r1_logs_table_and_restores_modes(caplog):
    img_loader, txt_loader, num_ids = make_loaders()
    model = OneHotModel(num_ids)
    model.train()
    model.head.eval()  # mixed modes must come back exactly
    entered = []

    @contextlib.contextmanager
    def autocast():
        entered.append(True)
        yield

    evaluator = Evaluator(img_loader, txt_loader, autocast=autocast)
    with caplog.at_level(logging.INFO, logger="utils.metrics"):
        r1 = evaluator.eval(model, i2t_metric=True)
    assert isinstance(r1, float) and r1 == pytest.approx(75.0)
    assert model.modes_seen and not any(model.modes_seen)
    assert model.training and not model.head.training
    assert len(entered) == 6  # 3 caption batches + 3 image batches
    assert "t2i" in caption_text(caplog) and "75.000" in caption_text(caplog) and "i2t" in caption_text(caplog)
    assert set(evaluator.last_results) == {"t2i", "i2t"}
    assert evaluator.last_results["t2i"]["R1"] == pytest.approx(75.0)
    # each caption has 2 correct images; the 6 right ones rank them 1, 2 (AP 1, INP 1). Caption 1 (pid 1,
    # encoded as identity 2) scores 1 on images 2 and 6 and 0 elsewhere, so the order is 2 6 0 1 3 4 5 7 and
    # its correct images 1 and 5 come at ranks 4 and 7: AP = (1/4 + 2/7) / 2, INP = 2/7; caption 6 alike.
    assert evaluator.last_results["t2i"]["mAP"] == pytest.approx(100 * (6 + 2 * (1 / 4 + 2 / 7) / 2) / 8, abs=1e-4)
    assert evaluator.last_results["t2i"]["mINP"] == pytest.approx(100 * (6 + 2 * 2 / 7) / 8, abs=1e-4)


def caption_text(caplog):
    return "\n".join(record.getMessage() for record in caplog.records)


def test_evaluator_compute_embeddings_shapes_and_normalisation():
    img_loader, txt_loader, num_ids = make_loaders(batch_size=5)
    text_feats, image_feats, q_pids, g_pids = Evaluator(img_loader, txt_loader).compute_embeddings(OneHotModel(num_ids))
    assert text_feats.shape == (8, num_ids) and image_feats.shape == (8, num_ids)
    assert text_feats.dtype == torch.float32
    assert torch.allclose(text_feats.norm(dim=1), torch.ones(8))
    assert q_pids.tolist() == [0, 1, 2, 3, 0, 1, 2, 3] and g_pids.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    for tensor in (text_feats, image_feats, q_pids, g_pids):
        assert not tensor.is_inference()  # callers may modify them in place
    text_feats /= 2


def test_evaluator_restores_modes_when_encoding_fails():
    img_loader, txt_loader, num_ids = make_loaders()
    model = OneHotModel(num_ids)
    model.train()
    bad_loader = [(torch.tensor([0]),)]  # one-element batches: not (pids, images)
    with pytest.raises(UserError, match="must yield \\(pids, images tensor\\) pairs"):
        Evaluator(bad_loader, txt_loader).eval(model)
    assert model.training and model.head.training


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"q_pids": torch.arange(4)}, "q_pids has 4 entries but there are 5"),
        ({"g_pids": torch.arange(7)}, "g_pids has 7 entries but there are 6"),
        ({"max_rank": 0}, "max_rank must be an integer >= 1"),
        ({"max_rank": -3}, "max_rank must be an integer >= 1"),
        ({"max_rank": 2.5}, "max_rank must be an integer >= 1"),
        ({"chunk_size": 0}, "chunk_size must be an integer >= 1"),
        ({"max_rank": True}, "max_rank must be an integer >= 1"),
        ({"q_pids": torch.zeros(5)}, "integer person ids"),
        ({"q_pids": torch.zeros(5, 1, dtype=torch.long)}, "must be 1-D"),
        ({"similarity": torch.zeros(6)}, "2-D tensor"),
        ({"similarity": torch.zeros(5, 6, dtype=torch.long)}, "floating-point"),
        ({"similarity": torch.zeros(0, 6), "q_pids": torch.zeros(0, dtype=torch.long)}, "empty"),
        ({"q_pids": torch.full((5,), 9)}, "none of the 5 queries shares a person id"),
    ],
)
def test_rank_bad_input(kwargs, message):
    args = {"similarity": torch.rand(5, 6), "q_pids": torch.tensor([0, 1, 0, 1, 2]),
            "g_pids": torch.tensor([0, 1, 2, 0, 1, 2]), "max_rank": 3}
    args.update(kwargs)
    with pytest.raises(UserError, match=message):
        rank(**args)


@pytest.mark.parametrize("method", METHODS)
def test_rank_rejects_nan(method):
    similarity = torch.rand(5, 300)
    similarity[3, 123] = float("nan")
    with pytest.raises(UserError, match="queries 2..3 contain NaN"):
        rank(similarity, torch.zeros(5, dtype=torch.long), torch.zeros(300, dtype=torch.long), chunk_size=2,
             method=method)
    text_feats = torch.rand(5, 4)
    text_feats[1, 2] = float("nan")
    with pytest.raises(UserError, match="queries 0..1 contain NaN"):
        rank_features(text_feats, torch.rand(300, 4), torch.zeros(5, dtype=torch.long),
                      torch.zeros(300, dtype=torch.long), chunk_size=2, method=method)


def test_rank_features_bad_input():
    text_feats, image_feats, q_pids, g_pids = random_features(18)
    with pytest.raises(UserError, match="dimension 16 but gallery_feats 8"):
        rank_features(text_feats, image_feats[:, :8], q_pids, g_pids)
    with pytest.raises(UserError, match="2-D floating-point"):
        rank_features(text_feats[0], image_feats, q_pids, g_pids)
    with pytest.raises(UserError, match="q_pids has 39 entries but there are 40"):
        rank_features(text_feats, image_feats, q_pids[1:], g_pids)


def test_evaluator_bad_input():
    img_loader, txt_loader, num_ids = make_loaders()
    with pytest.raises(UserError, match="captions loader is empty"):
        Evaluator(img_loader, []).compute_embeddings(OneHotModel(num_ids))

    class WrongRows(OneHotModel):
        def encode_image(self, images):
            return super().encode_image(images)[:1]

    with pytest.raises(UserError, match="gave features of shape \\(1, 4\\)"):
        Evaluator(img_loader, txt_loader).compute_embeddings(WrongRows(num_ids))
    with pytest.raises(UserError, match="chunk_size must be an integer >= 1"):
        Evaluator(img_loader, txt_loader, chunk_size=-1)


def test_reference_sanity():
    # the reference itself on the hand-worked case
    cmc, mAP, mINP, tops = reference_rank(torch.tensor([[0.9, 0.1, 0.8, 0.3, 0.5]]), [1], [2, 1, 1, 2, 1], 5)
    assert cmc == [0.0, 100.0, 100.0, 100.0, 100.0]
    assert mAP == pytest.approx(100 * (1 / 2 + 2 / 3 + 3 / 5) / 3) and mINP == pytest.approx(60.0)
    assert tops == [[0, 2, 4, 3, 1]]
    assert math.isclose(sum(cmc), 400.0)


# ----------------------------------------------------------------------------------------------------
# The reference twin (method="reference") and the fast path agree
# ----------------------------------------------------------------------------------------------------
def assert_same_results(got, expected):
    for value, reference in zip(got, expected):
        assert value.dtype == reference.dtype and value.shape == reference.shape
        if value.is_floating_point():
            assert torch.allclose(value, reference, atol=1e-4, rtol=0)
        else:
            assert torch.equal(value, reference)


def test_reference_method_matches_hand_computed_case():
    similarity = torch.tensor([[0.9, 0.1, 0.8, 0.3, 0.5], [0.2, 0.7, 0.7, 0.1, 0.6]])
    cmc, mAP, mINP, indices = rank(similarity, [1, 2], [2, 1, 1, 2, 1], max_rank=5, method="reference")
    assert cmc.tolist() == pytest.approx([0.0, 50.0, 50.0, 100.0, 100.0])
    assert float(mAP) == pytest.approx(45.694444, abs=1e-4) and float(mINP) == pytest.approx(50.0, abs=1e-5)
    assert indices.tolist() == [[0, 2, 4, 3, 1], [1, 2, 4, 0, 3]]


@pytest.mark.parametrize("seed", range(24))
def test_fast_equals_reference_method_on_random_cases(seed):
    # random sizes (chunks rarely divide Q), id counts (up to hundreds of correct items), ties, +-inf,
    # a correct item ranked last, max_rank above G, i2t (the transposed, non-contiguous matrix)
    similarity, q_pids, g_pids, gen = random_shape_case(1000 + seed, 40, 700, 30)
    num_queries, num_gallery = similarity.shape
    special = torch.rand(similarity.shape, generator=gen)
    similarity[special < 0.02] = float("-inf")
    similarity[special > 0.99] = float("inf")
    row = int(torch.randint(0, num_queries, (), generator=gen))
    similarity[row, (g_pids == q_pids[row]).nonzero()[-1, 0]] = similarity[row].min() - 1  # correct item last
    if seed % 3 == 2:  # i2t: gallery items as queries
        similarity, q_pids, g_pids = similarity.t(), g_pids, q_pids
        similarity[:, 0] = float("-inf")
    max_rank = int(torch.randint(1, num_gallery + 15, (), generator=gen))
    chunk_size = int(torch.randint(1, 13, (), generator=gen))
    fast = rank(similarity, q_pids, g_pids, max_rank, chunk_size=chunk_size)
    reference = rank(similarity, q_pids, g_pids, max_rank, chunk_size=chunk_size + 3, method="reference")
    assert_same_results(fast, reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fast_equals_reference_method_for_other_dtypes(dtype):
    similarity, q_pids, g_pids = random_case(30, 23, 400, 7, decimals=2, dtype=dtype)
    assert_same_results(rank(similarity, q_pids, g_pids, chunk_size=5),
                        rank(similarity, q_pids, g_pids, chunk_size=5, method="reference"))


@pytest.mark.parametrize("scale", [1e30, 1e-40, 1e-44, "overflow", "zeros"])
def test_extreme_score_ranges(scale):
    # huge, subnormal and overflowing ranges (row max - row min = inf), a row of signed zeros
    similarity, q_pids, g_pids = random_case(31, 9, 150, 5, decimals=1)
    if scale == "overflow":
        similarity = similarity.sign() * 3e38 + similarity
    elif scale == "zeros":
        similarity = torch.zeros_like(similarity)
        similarity[::2] = -0.0
    else:
        similarity = similarity * scale
    similarity = similarity.float()
    assert_matches_reference(similarity, q_pids, g_pids, chunk_size=4)


def test_many_blocks_and_bins(monkeypatch):
    import utils.ranking as metrics

    # a gallery large enough for the full number of bins, scanned a few rows per block
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 3 * 17000)
    similarity, q_pids, g_pids = random_case(32, 8, 17000, 40, decimals=3)
    assert metrics._num_bins(17000) == metrics._MAX_BINS
    assert_matches_reference(similarity, q_pids, g_pids, chunk_size=7)


def test_chunks_whose_queries_all_lack_correct_items(caplog):
    similarity, q_pids, g_pids = random_case(33, 10, 80, 4)
    q_pids = q_pids.clone()
    q_pids[[2, 5]] = 1000
    keep = torch.tensor([i not in (2, 5) for i in range(10)])
    _, ref_mAP, ref_mINP, ref_tops = reference_rank(similarity[keep], q_pids[keep], g_pids, 10)
    for method in METHODS:
        cmc, mAP, mINP, indices = rank(similarity, q_pids, g_pids, chunk_size=1, method=method)
        assert float(mAP) == pytest.approx(ref_mAP, abs=1e-4) and float(mINP) == pytest.approx(ref_mINP, abs=1e-4)
        assert indices[keep].tolist() == ref_tops


# ----------------------------------------------------------------------------------------------------
# Re-ranking
# ----------------------------------------------------------------------------------------------------
class TableReranker:
    """New scores from a fixed [Q, G] table; records the calls."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def __call__(self, query_indices, gallery_indices):
        self.calls.append((query_indices.clone(), gallery_indices.clone()))
        return self.table[query_indices[:, None], gallery_indices]

    def for_reference(self, query, items):
        return self.table[query, items].tolist()


@pytest.mark.parametrize(
    "seed, num_queries, num_gallery, num_ids, topk, max_rank, chunk_size",
    [
        (40, 17, 300, 9, 25, 10, 4),  # K above max_rank, chunks not dividing Q
        (41, 12, 200, 3, 5, 10, 5),  # K below max_rank; many correct items
        (42, 9, 40, 6, 40, 10, 9),  # K = G
        (43, 9, 30, 6, 1000, 35, 2),  # K > G, max_rank > G
        (44, 14, 120, 10, 1, 3, 3),  # a single re-scored item
    ],
)
def test_rerank_equals_brute_force_resort(seed, num_queries, num_gallery, num_ids, topk, max_rank, chunk_size):
    similarity, q_pids, g_pids = random_case(seed, num_queries, num_gallery, num_ids, decimals=1)
    gen = torch.Generator().manual_seed(seed)
    reranker = TableReranker(torch.round(torch.randn(num_queries, num_gallery, generator=gen), decimals=1))
    ref_cmc, ref_mAP, ref_mINP, ref_tops = reference_rank(similarity, q_pids, g_pids, max_rank,
                                                          reranker.for_reference, topk)
    for method in METHODS:
        cmc, mAP, mINP, indices = rank(similarity, q_pids, g_pids, max_rank, chunk_size=chunk_size, method=method,
                                       rerank=reranker, rerank_topk=topk)
        assert cmc.tolist() == pytest.approx(ref_cmc, abs=1e-4)
        assert float(mAP) == pytest.approx(ref_mAP, abs=1e-4) and float(mINP) == pytest.approx(ref_mINP, abs=1e-4)
        assert indices.tolist() == [top[:indices.shape[1]] for top in ref_tops]
    # called chunk by chunk with the query rows and each query's first-stage top K (by the stage-1 order)
    queries = torch.cat([q for q, _ in reranker.calls[-math.ceil(num_queries / chunk_size):]])
    assert queries.tolist() == list(range(num_queries))
    _, _, _, stage1 = reference_rank(similarity, q_pids, g_pids, min(topk, num_gallery))
    heads = torch.cat([g for _, g in reranker.calls[-math.ceil(num_queries / chunk_size):]])
    assert heads.tolist() == stage1


def test_perfect_reranker_gives_perfect_metrics_when_correct_items_are_in_the_top_k():
    similarity, q_pids, g_pids = random_case(45, 30, 200, 8)
    similarity[::2] += 2.0 * (q_pids[::2, None] == g_pids[None, :])  # every other query: correct items high
    topk = 60
    perfect = (q_pids[:, None] == g_pids[None, :]).float()  # [Q, G] new scores: 1 for correct items
    # queries whose correct items all rank within the first-stage top K
    _, _, _, stage1 = reference_rank(similarity, q_pids, g_pids, topk)
    inside = torch.tensor([set((g_pids == pid).nonzero().squeeze(1).tolist()) <= set(top)
                           for pid, top in zip(q_pids.tolist(), stage1)])
    assert 0 < int(inside.sum()) < 30
    cmc, mAP, mINP, indices = rank(similarity[inside], q_pids[inside], g_pids, rerank=TableReranker(perfect[inside]),
                                   rerank_topk=topk)
    assert cmc.tolist() == [100.0] * 10 and float(mAP) == pytest.approx(100.0) and float(mINP) == pytest.approx(100.0)
    assert not (g_pids[indices[:, 0]] != q_pids[inside]).any()
    # the others improve but stay imperfect: some correct item lies beyond K
    _, mAP_out, mINP_out, _ = rank(similarity[~inside], q_pids[~inside], g_pids, rerank=TableReranker(perfect[~inside]),
                                   rerank_topk=topk)
    _, mAP_before, _, _ = rank(similarity[~inside], q_pids[~inside], g_pids)
    assert float(mAP_before) < float(mAP_out) < 100.0 and float(mINP_out) < 100.0


def test_rerank_topk_zero_or_no_callback_is_stage_one():
    similarity, q_pids, g_pids = random_case(46, 11, 90, 5)
    reranker = TableReranker(torch.randn(11, 90))
    expected = rank(similarity, q_pids, g_pids)
    assert_same_results(rank(similarity, q_pids, g_pids, rerank=reranker, rerank_topk=0), expected)
    assert_same_results(rank(similarity, q_pids, g_pids, rerank=None, rerank_topk=20), expected)
    assert reranker.calls == []


def test_rank_features_rerank_equals_similarity_path():
    text_feats, image_feats, q_pids, g_pids = random_features(47)
    text_feats, image_feats = F.normalize(text_feats, dim=1), F.normalize(image_feats, dim=1)
    reranker = TableReranker(torch.randn(40, 30))
    expected = rank(text_feats @ image_feats.t(), q_pids, g_pids, rerank=reranker, rerank_topk=12)
    got = rank_features(text_feats, image_feats, q_pids, g_pids, chunk_size=7, rerank=reranker, rerank_topk=12)
    assert torch.equal(got[3], expected[3])
    assert_same_results(got[:3], expected[:3])


@pytest.mark.parametrize(
    "rerank, message",
    [
        (lambda q, g: torch.zeros(len(q), 3), "rerank must return a tensor of shape \\(4, 5\\)"),
        (lambda q, g: torch.full(g.shape, float("nan")), "without NaN"),
        (lambda q, g: torch.zeros(g.shape, dtype=torch.long), "without NaN .* got dtype torch.int64"),
        (lambda q, g: [0.0] * 5, "got list"),
        ("not callable", "rerank must be a callable"),
    ],
)
def test_rerank_bad_output(rerank, message):
    similarity, q_pids, g_pids = random_case(48, 4, 30, 3)
    with pytest.raises(UserError, match=message):
        rank(similarity, q_pids, g_pids, rerank=rerank, rerank_topk=5)


# ----------------------------------------------------------------------------------------------------
# Evaluator with a retrieval object (encode_images / encode_texts / rerank)
# ----------------------------------------------------------------------------------------------------
class CrossEncoderRetriever:
    """Not a module: one-hot features like OneHotModel, and a re-ranker that reads the identities it stored
    while encoding (as a cross-encoder keeps image tokens) and scores 1 for a matching identity."""

    def __init__(self, num_ids, truth):
        self.num_ids = num_ids
        self.truth = truth  # caption index -> true identity (the encoded one may be wrong)
        self.events = []
        self.image_ids = []

    def encode_images(self, images):
        self.events.append("images")
        assert torch.is_inference_mode_enabled()
        ids = images[:, 0, 0, 0].long()
        self.image_ids.append(ids)
        return F.one_hot(ids, self.num_ids).float()

    def encode_texts(self, caption_ids):
        self.events.append("texts")
        return F.one_hot(caption_ids[:, 0], self.num_ids).float()

    def rerank(self, query_indices, gallery_indices):
        self.events.append("rerank")
        assert torch.is_inference_mode_enabled()
        images = torch.cat(self.image_ids)[gallery_indices]  # [q, K]
        return (images == self.truth[query_indices][:, None]).to(torch.float16)


def test_evaluator_with_a_reranking_retrieval_object():
    img_loader, txt_loader, num_ids = make_loaders()
    truth = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    retriever = CrossEncoderRetriever(num_ids, truth)
    assert Evaluator(img_loader, txt_loader).eval(retriever) == pytest.approx(75.0)  # stage 1 only
    retriever.events.clear()
    retriever.image_ids.clear()
    evaluator = Evaluator(img_loader, txt_loader, rerank_topk=8, chunk_size=3)
    assert evaluator.eval(retriever, i2t_metric=True) == pytest.approx(100.0)
    assert evaluator.last_results["t2i"] == {"R1": 100.0, "R5": 100.0, "R10": 100.0, "mAP": 100.0, "mINP": 100.0}
    assert evaluator.last_results["t2i-stage1"]["R1"] == pytest.approx(75.0)  # the first stage is reported too
    assert evaluator.last_results["i2t"]["R1"] == pytest.approx(75.0)  # i2t is never re-ranked
    # the gallery first, then the captions, then the re-ranking calls (3 chunks of captions)
    assert retriever.events == ["images"] * 3 + ["texts"] * 3 + ["rerank"] * 3


def test_evaluator_rerank_topk_needs_a_rerank_method():
    img_loader, txt_loader, num_ids = make_loaders()
    with pytest.raises(UserError, match="rerank_topk=4 asks for re-ranking, but the model has no rerank method"):
        Evaluator(img_loader, txt_loader, rerank_topk=4).eval(OneHotModel(num_ids))
    with pytest.raises(UserError, match="needs encode_image and encode_text"):
        Evaluator(img_loader, txt_loader).eval(torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match="rerank_topk must be an integer >= 0"):
        Evaluator(img_loader, txt_loader, rerank_topk=-1)
    with pytest.raises(UserError, match="method must be one of fast, reference"):
        Evaluator(img_loader, txt_loader, method="slow")


def test_evaluator_with_several_query_sets():
    img_loader, txt_loader, num_ids = make_loaders()
    q_pids = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    right = DataLoader(TensorDataset(q_pids, torch.stack([q_pids, q_pids], dim=1)), batch_size=3)
    evaluator = Evaluator(img_loader, {"en": txt_loader, "zh": right}, method="reference")
    assert evaluator.eval(OneHotModel(num_ids)) == pytest.approx((75.0 + 100.0) / 2)  # the mean over query sets
    assert list(evaluator.last_results) == ["t2i-en", "t2i-zh"]
    assert evaluator.last_results["t2i-zh"]["R1"] == pytest.approx(100.0)


def test_evaluator_gives_each_query_set_its_own_encoders():
    """A retrieval object with for_query_set (e.g. one text projection per language): images encoded once."""
    img_loader, txt_loader, num_ids = make_loaders()
    q_pids = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    right = DataLoader(TensorDataset(q_pids, torch.stack([q_pids, q_pids], dim=1)), batch_size=3)
    calls = []

    class PerLanguage(OneHotModel):
        def for_query_set(self, name):
            calls.append(name)
            model = OneHotModel(self.num_ids)
            if name == "zh":  # this language's "projection" always points at identity 0
                model.encode_text = lambda ids: F.one_hot(torch.zeros_like(ids[:, 0]), self.num_ids).float()
            return model

    evaluator = Evaluator(img_loader, {"en": right, "zh": right}, wrap=lambda m: PerLanguage(num_ids))
    evaluator.eval(torch.nn.Linear(1, 1))  # the module itself is only the source of the wrapped object
    assert calls == ["en", "zh"] and evaluator.last_results["t2i-en"]["R1"] == pytest.approx(100.0)
    assert evaluator.last_results["t2i-zh"]["R1"] == pytest.approx(25.0)  # only the identity-0 captions hit
    text_feats, _, q_ids, _ = evaluator.compute_embeddings(OneHotModel(num_ids), query_set="zh")
    assert torch.equal(text_feats.argmax(dim=1), q_ids)
    with pytest.raises(UserError, match="several query sets \\(en, zh\\)"):
        evaluator.compute_embeddings(OneHotModel(num_ids))


def test_bad_method():
    similarity, q_pids, g_pids = random_case(49, 4, 30, 3)
    with pytest.raises(UserError, match="method must be one of fast, reference; got 'sort'"):
        rank(similarity, q_pids, g_pids, method="sort")
    with pytest.raises(UserError, match="rerank_topk must be an integer >= 0"):
        rank(similarity, q_pids, g_pids, rerank=TableReranker(similarity), rerank_topk=1.5)


# ----------------------------------------------------------------------------------------------------
# Engines of the fast path
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["compiled"], indirect=True)
def test_compiled_engine_gives_the_same_results_with_any_number_of_threads():
    similarity, q_pids, g_pids = random_case(50, 37, 900, 12, decimals=2)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 3, 5):
            torch.set_num_threads(count)
            results.append(rank(similarity, q_pids, g_pids, max_rank=20, chunk_size=11))
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        for got, expected in zip(result, results[0]):
            assert torch.equal(got, expected)
    assert_matches_reference(similarity, q_pids, g_pids, max_rank=20, chunk_size=11)


@pytest.mark.parametrize("engine", ["compiled"], indirect=True)
def test_compiled_engine_is_the_one_used_on_the_cpu(monkeypatch):
    calls = []
    original = ranking._rank_chunk_compiled
    monkeypatch.setattr(ranking, "_rank_chunk_compiled", lambda *args: calls.append(1) or original(*args))
    rank(*random_case(51, 6, 50, 4), chunk_size=4)
    assert calls == [1, 1]


def test_engine_from_the_environment(monkeypatch):
    monkeypatch.setattr(ranking, "_engine_choice", None)
    similarity, q_pids, g_pids = random_case(52, 6, 50, 4)
    monkeypatch.setenv(ranking.ENGINE_VARIABLE, "fastest")
    with pytest.raises(UserError, match="IRRA_RANK_ENGINE: the ranking engine must be one of auto, compiled, tensor; "
                                        "got 'fastest'"):
        rank(similarity, q_pids, g_pids)
    monkeypatch.setenv(ranking.ENGINE_VARIABLE, "tensor")
    monkeypatch.setattr(ranking, "_rank_chunk_compiled", None)  # would fail if called
    assert_matches_reference(similarity, q_pids, g_pids)
    with pytest.raises(UserError, match="set_fast_engine: the ranking engine must be one of"):
        ranking.set_fast_engine("numba")


def test_without_numba_auto_uses_tensor_operations_and_compiled_says_how_to_get_it(monkeypatch, caplog):
    monkeypatch.setattr(ranking, "_kernel_module", None)
    import builtins

    real_import = builtins.__import__

    def no_numba(name, *args, **kwargs):
        if name == "numba" or name.startswith("numba."):
            raise ImportError("No module named 'numba'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_numba)
    import sys

    import utils

    monkeypatch.delitem(sys.modules, "utils.rank_kernel", raising=False)  # imported again, without numba
    monkeypatch.delattr(utils, "rank_kernel", raising=False)
    similarity, q_pids, g_pids = random_case(53, 6, 50, 4)
    ranking.set_fast_engine("auto")
    with caplog.at_level(logging.INFO, logger="utils.ranking"):
        assert_matches_reference(similarity, q_pids, g_pids)
    assert "numba cannot be imported" in caplog.text and "pip install numba" in caplog.text
    ranking.set_fast_engine("compiled")
    with pytest.raises(UserError, match="the compiled ranking engine needs numba.*pip install numba"):
        rank(similarity, q_pids, g_pids)
