"""Tests for model/biirra.py: the encoders, the non-causal fusion encoder, the branches of the training forward,
the criterion, and the command-line flags and builders."""

from dataclasses import replace

import pytest
import torch
from transformers import XLMRobertaConfig, XLMRobertaModel

from model import biirra_net as B
from utils.options import get_args
from model import biirra_objectives as objectives
from tests.biirra_helpers import PAD, VOCAB, tiny_batch, tiny_config, tiny_model
from utils.errors import UserError
from utils.tokenizers import SpecialIds


def train_forward(model, batch, seed=0):
    torch.manual_seed(seed)  # the hard-negative draws use torch's global generator
    return model(batch)


# ---------------------------------------------------------------- encoders
def test_image_encoder_output_layout_and_mask_token():
    model = tiny_model().eval()
    enc = model.vision_encoder
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 5, 6]] = True
    with torch.no_grad():
        tokens = enc(images, mask)
        # Reference: the same steps written out, with masked patch embeddings replaced by the mask token.
        x = enc.beit.patch_embed(images)
        x[mask] = enc.mask_token[0, 0]
        x = torch.cat([enc.beit.cls_token.expand(2, -1, -1), x], dim=1)
        for block in enc.beit.blocks:
            x = block(x)
        patches = enc.beit.fc_norm(x[:, 1:])
        expected = torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)
        torch.testing.assert_close(tokens, expected)
        assert tokens.shape == (2, 17, 32)
        torch.testing.assert_close(enc(images, torch.zeros_like(mask)), enc(images))
        # Only the image with masked patches changes.
        clean = enc(images)
        assert not torch.allclose(tokens[0], clean[0]) and torch.allclose(tokens[1], clean[1])


def test_image_mask_of_wrong_size_is_a_user_error():
    model = tiny_model()
    with pytest.raises(UserError, match="16 patches"):
        model.image_tokens(torch.randn(2, 3, 32, 32), torch.zeros(2, 49, dtype=torch.bool))


def test_target_projection_starts_as_a_copy_and_is_used_for_the_target_language():
    model = tiny_model().eval()
    torch.testing.assert_close(model.text_proj_target.weight, model.text_proj.weight)
    assert model.text_proj_target.weight is not model.text_proj.weight
    ids = tiny_batch(model.config)[B.keyed(B.CAPTION_IDS, "en")]
    before = {lang: model.encode_text(ids, language=lang) for lang in ("en", "ch")}
    torch.testing.assert_close(before["en"], before["ch"])
    with torch.no_grad():
        model.text_proj_target.weight.mul_(-1)
    assert torch.allclose(model.encode_text(ids, language="en"), before["en"])
    assert not torch.allclose(model.encode_text(ids, language="ch"), before["ch"])
    torch.testing.assert_close(model.encode_text(ids).norm(dim=1), torch.ones(ids.shape[0]))
    with pytest.raises(UserError, match="not 'fr'"):
        model.encode_text(ids, language="fr")


# ---------------------------------------------------------------- fusion encoder
def test_fusion_is_not_causal_and_respects_the_key_masks():
    torch.manual_seed(0)
    fusion = B.FusionEncoder(32, B.BiIrraFusionCfg(layers=2, heads=2, intermediate=64)).eval()
    queries, context = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    query_mask = torch.ones(2, 6, dtype=torch.bool)
    query_mask[:, 5] = False
    context_mask = torch.ones(2, 5, dtype=torch.bool)
    context_mask[:, 4] = False
    with torch.no_grad():
        out = fusion(queries, query_mask, context, context_mask)
        later = queries.clone()
        later[:, 3] += 1.0  # a later (real) query token changes an earlier token's output: not causal
        assert not torch.allclose(fusion(later, query_mask, context, context_mask)[:, 0], out[:, 0])
        padded = queries.clone()
        padded[:, 5] += 10.0  # a padded query token is invisible to the others
        torch.testing.assert_close(fusion(padded, query_mask, context, context_mask)[:, :5], out[:, :5])
        hidden = context.clone()
        hidden[:, 4] += 10.0  # so is a padded context token
        torch.testing.assert_close(fusion(queries, query_mask, hidden, context_mask), out)
        seen = context.clone()
        seen[:, 2] += 1.0
        assert not torch.allclose(fusion(queries, query_mask, seen, context_mask), out)


def test_transformers_cross_attention_stack_is_causal_which_is_why_fusion_builds_its_own():
    # transformers 5 only builds cross-attention layers with is_decoder=True, and then masks self-attention
    # causally: a later token cannot change an earlier token's output. The fusion encoder must not behave so.
    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=20, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64, is_decoder=True, add_cross_attention=True)
    decoder = XLMRobertaModel(config, add_pooling_layer=False).eval()
    ids, later = torch.tensor([[0, 5, 6, 7, 2]]), torch.tensor([[0, 5, 6, 9, 2]])
    context = torch.randn(1, 4, 32)
    with torch.no_grad():
        first = decoder(input_ids=ids, encoder_hidden_states=context).last_hidden_state
        second = decoder(input_ids=later, encoder_hidden_states=context).last_hidden_state
    torch.testing.assert_close(first[:, :3], second[:, :3])


# ---------------------------------------------------------------- training forward
def test_forward_outputs_losses_and_every_parameter_learns():
    model = tiny_model()
    batch = tiny_batch(model.config)
    out = train_forward(model, batch)
    assert set(out) == set(B.OUTPUT_KEYS)
    assert out[B.keyed(B.ITM_LOGITS, "src")].shape == (12, 2)
    assert out[B.OUT_DMIM_STUDENT].shape == out[B.OUT_DMIM_TEACHER].shape == (4, 17, 32)
    masked = batch[B.keyed(B.MLM_LABELS, "en")] != PAD
    assert out[B.keyed(B.MLM_LOGITS, "src")].shape == (int(masked.sum()), VOCAB)
    assert torch.equal(out[B.keyed(B.MLM_TARGETS, "src")], batch[B.keyed(B.CAPTION_IDS, "en")][masked])
    losses = B.BiIrraCriterion()(out, batch)
    total = sum(v for k, v in losses.items() if k.endswith("_loss"))
    assert torch.isfinite(total)
    total.backward()
    # Every parameter takes part in every step (DistributedDataParallel without unused-parameter search).
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_forward_runs_under_autocast():
    model = tiny_model()
    batch = tiny_batch(model.config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = B.BiIrraCriterion()(train_forward(model, batch), batch)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for k, v in losses.items() if k.endswith("_loss"))


def test_criterion_weighs_the_objectives():
    model = tiny_model()
    batch = tiny_batch(model.config)
    out = train_forward(model, batch)
    got = B.BiIrraCriterion(B.BiIrraLossWeights(itc=2.0, aitm=4.0, mlm=0.5, dmim=3.0))(out, batch)
    tau, pids = out[B.OUT_TEMPERATURE], batch[B.PIDS]
    image = out[B.OUT_IMAGE_FEATS]
    itc = [objectives.compute_itc_pid(image, out[B.keyed(B.TEXT_FEATS, r)], pids, tau) for r in B.ROLES]
    itm = [objectives.compute_itm(out[B.keyed(B.ITM_LOGITS, r)]) for r in B.ROLES]
    mlm = [objectives.compute_masked_lm(out[B.keyed(B.MLM_LOGITS, r)], out[B.keyed(B.MLM_TARGETS, r)]) for r in B.ROLES]
    dmim = objectives.compute_dmim(out[B.OUT_DMIM_STUDENT], out[B.OUT_DMIM_TEACHER])
    torch.testing.assert_close(got["itc_loss"], (itc[0] + itc[1]) / 2 * 2.0)
    torch.testing.assert_close(got["aitm_loss"], (itm[0] + itm[1]) / 2 * 4.0)
    torch.testing.assert_close(got["mlm_loss"], (mlm[0] + mlm[1]) * 0.5)
    torch.testing.assert_close(got["dmim_loss"], dmim * 3.0)
    assert 0.0 <= got["itm_acc"].item() <= 1.0 and got["temperature"].item() == pytest.approx(0.07)
    with pytest.raises(UserError, match="≥ 0"):
        B.BiIrraCriterion(B.BiIrraLossWeights(dmim=-1.0))


def test_hard_negatives_of_the_forward_never_share_the_anchor_identity(monkeypatch):
    drawn = []
    original = objectives.sample_hard_negatives

    def recording(query_feats, gallery_feats, query_pids, gallery_pids, *args, **kwargs):
        picked = original(query_feats, gallery_feats, query_pids, gallery_pids, *args, **kwargs)
        drawn.append((query_pids, gallery_pids[picked]))
        return picked

    monkeypatch.setattr(objectives, "sample_hard_negatives", recording)
    model = tiny_model()
    for seed in range(5):
        train_forward(model, tiny_batch(model.config, pids=(3, 3, 7, 7, 9), seed=seed), seed=seed)
    assert len(drawn) == 5 * 2 * 2  # an image and a text per branch, two branches
    assert all(not bool((anchor == negative).any()) for anchor, negative in drawn)


def test_target_branch_sees_the_masked_image_and_the_source_branch_does_not():
    model = tiny_model().eval()  # no dropout: outputs depend on the inputs only
    batch = tiny_batch(model.config)
    other = dict(batch, **{B.IMAGE_MASK: ~batch[B.IMAGE_MASK]})
    with torch.no_grad():
        first, second = train_forward(model, batch), train_forward(model, other)
        unchanged = [B.keyed(B.ITM_LOGITS, "src"), B.keyed(B.MLM_LOGITS, "src"), B.keyed(B.MLM_LOGITS, "tgt"),
                     B.OUT_DMIM_TEACHER, B.OUT_IMAGE_FEATS]
        for key in unchanged:
            torch.testing.assert_close(first[key], second[key])
        for key in (B.keyed(B.ITM_LOGITS, "tgt"), B.OUT_DMIM_STUDENT):
            assert not torch.allclose(first[key], second[key])
        # The student is exactly the D-MIM head on fusion(masked image, target caption).
        masked = model.image_tokens(batch[B.IMAGES], batch[B.IMAGE_MASK])
        tgt = B.keyed(B.CAPTION_IDS, "ch"), B.keyed(B.ATTENTION_MASK, "ch")
        text = model.text_tokens(batch[tgt[0]], batch[tgt[1]])
        student = model.dmim_head(model.fusion(masked, None, text, batch[tgt[1]]))
        torch.testing.assert_close(first[B.OUT_DMIM_STUDENT], student)
        # The positive pairs of the target branch fuse the target caption with the masked image.
        positives = model.match_logits(text, batch[tgt[1]], masked)
        torch.testing.assert_close(first[B.keyed(B.ITM_LOGITS, "tgt")][:4], positives)


def test_teacher_gets_no_gradient():
    model = tiny_model()
    batch = tiny_batch(model.config)
    out = train_forward(model, batch)
    teacher = out[B.OUT_DMIM_TEACHER]
    assert not teacher.requires_grad and teacher.grad_fn is None
    objectives.compute_dmim(out[B.OUT_DMIM_STUDENT], teacher).backward()
    # The D-MIM loss trains the student side only: the masked image's mask token, the head, the fusion.
    assert model.vision_encoder.mask_token.grad.abs().sum() > 0
    assert model.dmim_head[0].weight.grad.abs().sum() > 0
    # Nothing of the loss reaches the projections (neither branch's global features take part).
    assert model.text_proj.weight.grad is None and model.vision_proj.weight.grad is None


def test_temperature_is_clamped_at_each_forward():
    model = tiny_model()
    with torch.no_grad():
        model.temp.fill_(5.0)
    out = train_forward(model, tiny_batch(model.config))
    assert model.temp.item() == pytest.approx(0.5) and out[B.OUT_TEMPERATURE].item() == pytest.approx(0.5)


def test_missing_batch_keys_and_bad_configs_are_user_errors():
    model = tiny_model()
    batch = tiny_batch(model.config)
    del batch[B.keyed(B.MLM_IDS, "ch")]
    with pytest.raises(UserError, match="mlm_ids_ch"):
        model(batch)
    with pytest.raises(UserError, match="exactly two different languages"):
        B.BiIRRA(tiny_config(), languages=("en", "en"))
    config = tiny_config()
    with pytest.raises(UserError, match="must equal the text width"):
        B.BiIRRA(replace(config, vision=replace(config.vision, width=48)))
    with pytest.raises(UserError, match="not a multiple of the patch size"):
        B.BiIRRA(replace(config, vision=replace(config.vision, img_size=(30, 32))))
    with pytest.raises(UserError, match="divisible"):
        B.BiIRRA(replace(config, fusion=replace(config.fusion, heads=3)))


def test_save_load_reproduces_the_outputs(tmp_path):
    model = tiny_model(seed=1).eval()
    batch = tiny_batch(model.config)
    path = tmp_path / "biirra.pth"
    torch.save(model.state_dict(), path)
    again = tiny_model(seed=2).eval()
    again.load_state_dict(torch.load(path, weights_only=True), strict=True)
    with torch.no_grad():
        first, second = train_forward(model, batch), train_forward(again, batch)
    for key in B.OUTPUT_KEYS:
        assert torch.equal(first[key], second[key]), key
    # The tied language-model decoder is still the word embedding table after loading.
    assert again.text_encoder.lm_head.decoder.weight is again.text_encoder.roberta.embeddings.word_embeddings.weight


# ---------------------------------------------------------------- flags and builders
def parse(argv):
    """Bi-IRRA's options through the project's command line (``--model biirra --languages en,ch`` first)."""
    return get_args(["--model", "biirra", "--languages", "en,ch", "--img_size", "224", "224", *argv])


class StubTokenizer:
    vocab_size = VOCAB
    specials = SpecialIds(pad=PAD, bos=0, eos=2, mask=VOCAB - 1, unk=3)


def test_flags_have_the_paper_defaults():
    args = parse([])
    assert (args.rerank_topk, args.biirra_temperature, args.biirra_image_mask_ratio) == (256, 0.07, 0.5)
    weights = (args.biirra_itc_weight, args.biirra_aitm_weight, args.biirra_mlm_weight, args.biirra_dmim_weight)
    assert weights == (1.0, 4.0, 1.0, 4.0)
    assert args.loss_names == "itc+aitm+mlm+dmim" and args.MLM is True


@pytest.mark.parametrize("argv, flag", [
    (["--languages", "en"], "--languages"),
    (["--languages", "en,ch,fr"], "--languages"),
    (["--xlmr_dir", "/no/such/dir"], "--xlmr_dir"),
    (["--cclm_checkpoint", "/no/such/file.th"], "--cclm_checkpoint"),
    (["--rerank_topk", "-1"], "--rerank_topk"),
    (["--biirra_rerank_batch", "0"], "--biirra_rerank_batch"),
    (["--biirra_dmim_weight", "-2"], "--biirra_dmim_weight"),
    (["--biirra_temperature", "0.9"], "--biirra_temperature"),
    (["--biirra_image_mask_ratio", "1.0"], "--biirra_image_mask_ratio"),
    (["--biirra_embed_dim", "0"], "--biirra_embed_dim"),
    (["--biirra_fusion_layers", "0"], "--biirra_fusion_layers"),
    (["--img_size", "230", "224"], "--img_size 230 224"),
    (["--loss_names", "itc+sdm"], "biirra knows itc, aitm, mlm, dmim"),
])
def test_bad_flags_name_the_flag(argv, flag):
    with pytest.raises(UserError, match=flag):
        parse(argv)


def test_cclm_checkpoint_needs_base_sizes_and_224_images(tmp_path):
    path = tmp_path / "cclm.th"
    path.write_bytes(b"")
    with pytest.raises(UserError, match="--biirra_arch tiny"):
        parse(["--cclm_checkpoint", str(path), "--biirra_arch", "tiny"])
    with pytest.raises(UserError, match="--img_size 384 128"):
        parse(["--cclm_checkpoint", str(path), "--img_size", "384", "128"])


def test_builders_read_the_flags():
    args = parse(["--biirra_arch", "tiny", "--img_size", "32", "32", "--biirra_embed_dim", "24",
                  "--biirra_fusion_layers", "1", "--languages", "en,fr", "--biirra_aitm_weight", "2"])
    config = B.build_biirra_config(args, StubTokenizer())
    assert (config.text.vocab_size, config.text.pad_id, config.embed_dim, config.fusion.layers) == (VOCAB, PAD, 24, 1)
    assert config.vision.img_size == (32, 32) and config.vision.width == B.ARCHITECTURES["tiny"].vision.width
    model = B.build_biirra_model(args, num_classes=5, tokenizer=StubTokenizer())
    assert model.languages == ("en", "fr") and len(model.fusion.layer) == 1
    assert model.text_encoder.config.vocab_size == VOCAB
    assert B.build_biirra_criterion(args).weights == B.BiIrraLossWeights(aitm=2.0)
