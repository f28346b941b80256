"""Tests for model/biirra_retrieval.py: chunked stage-2 scores equal a brute-force ITM scoring, the two-stage
order, a perfect matching head, the evaluator callback, and save -> load."""

import pytest
import torch

from model import biirra_net as B
from model.biirra_retrieval import BiIrraRetrieval, make_rerank_callback, top_k_indices, two_stage_scores
from tests.biirra_helpers import captions, tiny_model
from utils.errors import UserError


@pytest.fixture(scope="module")
def encoded():
    model = tiny_model(seed=4).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(7, 3, 32, 32, generator=g)
    ids = captions(5, 10, g)
    retrieval = BiIrraRetrieval(model, "en", pairs_per_batch=4)
    image_feats, image_tokens = retrieval.encode_images(images)
    text_feats, text_tokens, text_mask = retrieval.encode_texts(ids)
    return model, retrieval, images, ids, image_feats, image_tokens, text_feats, text_tokens, text_mask


def brute_force(model, text_tokens, text_mask, image_tokens, gallery_indices):
    scores = torch.empty(gallery_indices.shape)
    with torch.no_grad():
        for i in range(gallery_indices.shape[0]):
            for j, g in enumerate(gallery_indices[i].tolist()):
                scores[i, j] = model.match_logits(text_tokens[i:i + 1], text_mask[i:i + 1], image_tokens[g:g + 1])[0, 1]
    return scores


@pytest.mark.parametrize("pairs", [1, 3, 4, 100])
def test_stage_two_equals_brute_force_itm_on_the_top_k(encoded, pairs):
    model, _, _, _, image_feats, image_tokens, text_feats, text_tokens, text_mask = encoded
    top = top_k_indices(text_feats @ image_feats.t(), 3)
    retrieval = BiIrraRetrieval(model, "en", pairs_per_batch=pairs)
    got = retrieval.rerank(text_tokens, text_mask, image_tokens, top)
    torch.testing.assert_close(got, brute_force(model, text_tokens, text_mask, image_tokens, top))


def test_callback_scores_the_asked_queries(encoded):
    model, retrieval, _, _, image_feats, image_tokens, text_feats, text_tokens, text_mask = encoded
    callback = make_rerank_callback(retrieval, text_tokens, text_mask, image_tokens)
    queries = torch.tensor([4, 1])
    gallery = torch.tensor([[6, 0, 2], [3, 3, 5]])
    expected = brute_force(model, text_tokens[queries], text_mask[queries], image_tokens, gallery)
    torch.testing.assert_close(callback(queries, gallery), expected)


def test_encoders_match_the_model_and_use_the_query_language(encoded):
    model, retrieval, images, ids, image_feats, _, text_feats, text_tokens, text_mask = encoded
    torch.testing.assert_close(image_feats, model.encode_image(images))
    torch.testing.assert_close(text_feats, model.encode_text(ids))
    assert torch.equal(text_mask, ids != B.BiIrraTextCfg().pad_id)
    assert text_tokens.shape == (5, 10, 32)
    other = tiny_model(seed=4).eval()
    with torch.no_grad():
        other.text_proj_target.bias.add_(1.0)
    chinese = BiIrraRetrieval(other, "ch").encode_texts(ids)[0]
    torch.testing.assert_close(chinese, other.encode_text(ids, language="ch"))
    torch.testing.assert_close(BiIrraRetrieval(other, "en").encode_texts(ids)[0], text_feats)
    assert not torch.allclose(chinese, text_feats)
    with pytest.raises(UserError, match="not 'fr'"):
        BiIrraRetrieval(model, "fr")
    with pytest.raises(UserError, match="--biirra_rerank_batch"):
        BiIrraRetrieval(model, "en", pairs_per_batch=0)


def loop_ranking(similarity, stage2, k):
    """Per row: the top k by stage 1 (ties: lower index), re-ordered by stage 2, then the rest in stage-1 order."""
    rankings = []
    for row, rescored in zip(similarity.tolist(), stage2):
        by_stage1 = sorted(range(len(row)), key=lambda j: (-row[j], j))
        top = sorted(by_stage1[:k], key=lambda j: (-rescored[j], by_stage1.index(j)))
        rankings.append(top + by_stage1[k:])
    return rankings


@pytest.mark.parametrize("k", [1, 3, 6, 9])
def test_two_stage_order(k):
    g = torch.Generator().manual_seed(5)
    similarity = torch.rand(4, 6, generator=g).round(decimals=1)  # rounding makes stage-1 ties
    itm = torch.randn(4, 6, generator=g) * 50

    def rerank(queries, gallery):
        return itm[queries[:, None], gallery]

    final = two_stage_scores(similarity, rerank, k)
    order = torch.sort(final, dim=1, descending=True, stable=True).indices.tolist()
    assert order == loop_ranking(similarity, itm.tolist(), min(k, 6))
    top = top_k_indices(similarity, k)
    assert torch.equal(final.gather(1, top), itm.gather(1, top).double())
    assert torch.equal(two_stage_scores(similarity, rerank, 0), similarity.double())


def test_perfect_matching_head_gives_perfect_metrics_within_the_top_k():
    g = torch.Generator().manual_seed(6)
    query_pids, gallery_pids = torch.tensor([0, 1, 2, 3]), torch.tensor([3, 0, 2, 1, 0, 2, 3, 1])
    similarity = torch.rand(4, 8, generator=g)
    matches = query_pids[:, None] == gallery_pids[None, :]

    def perfect(queries, gallery):
        return matches[queries[:, None], gallery].float()

    final = two_stage_scores(similarity, perfect, 8)
    order = torch.sort(final, dim=1, descending=True, stable=True).indices
    hits = matches.gather(1, order)
    assert bool(hits[:, 0].all())  # R1 = 100
    positives = matches.sum(dim=1)
    assert bool((hits[:, :2].sum(dim=1) == positives).all())  # every match first: mAP = 100
    stage1 = matches.gather(1, torch.sort(similarity, dim=1, descending=True, stable=True).indices)
    assert not bool(stage1[:, 0].all())  # the random stage 1 was not perfect


def test_save_load_gives_identical_scores(encoded, tmp_path):
    model, retrieval, images, ids = encoded[:4]
    # Encoded here, not in the module fixture: the thread count (set per test) changes float summation order.
    image_feats, image_tokens = retrieval.encode_images(images)
    text_feats, text_tokens, text_mask = retrieval.encode_texts(ids)
    top = top_k_indices(text_feats @ image_feats.t(), 4)
    scores = retrieval.rerank(text_tokens, text_mask, image_tokens, top)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    again = tiny_model(seed=9)
    again.load_state_dict(torch.load(tmp_path / "m.pth", weights_only=True))
    loaded = BiIrraRetrieval(again, "en", pairs_per_batch=4)
    feats2, tokens2 = loaded.encode_images(images)
    tfeats2, ttokens2, tmask2 = loaded.encode_texts(ids)
    assert torch.equal(feats2, image_feats) and torch.equal(tfeats2, text_feats)
    assert torch.equal(loaded.rerank(ttokens2, tmask2, tokens2, top), scores)
