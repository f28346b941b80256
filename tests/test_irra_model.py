"""Tests for model/irra.py: the IRRA model and its criterion on a tiny CPU configuration."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from model import IRRA, IRRACriterion, build_criterion, build_model, objectives
from model.clip_model import CLIP, CLIPConfig, CLIPTextCfg, CLIPVisionCfg, save_openai_checkpoint
from utils.errors import UserError


VOCAB = 60
CFG = CLIPConfig(
    embed_dim=64,
    vision=CLIPVisionCfg(patch_size=8, width=64, layers=1, heads=1),
    text=CLIPTextCfg(context_length=10, vocab_size=VOCAB, width=64, layers=1, heads=1),
)
ALL_LOSSES = ("itc", "sdm", "cmpm", "id", "mlm")


def make_irra(losses=ALL_LOSSES, seed=0) -> IRRA:
    torch.manual_seed(seed)
    return IRRA(CLIP(CFG, (32, 16), 8), num_classes=5, with_id="id" in losses, with_mlm="mlm" in losses,
                cmt_depth=2, vocab_size=VOCAB)


class Trainable:
    """A model and its criterion called together, as one training step does."""

    def __init__(self, losses=ALL_LOSSES, seed=0, weights=None, temperature=0.02):
        self.model = make_irra(losses, seed)
        self.criterion = IRRACriterion(losses, weights, temperature)

    def __call__(self, batch):
        return self.criterion(self.model(batch), batch)


def make_batch(seed=1, batch=4, length=10):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB - 3, (batch, length), generator=gen)
    ids[:, 7] = VOCAB - 1  # end of text
    ids[:, 8:] = 0
    mlm_ids, mlm_labels = ids.clone(), torch.zeros_like(ids)
    for row, col in [(0, 1), (0, 4), (1, 2), (2, 3), (3, 1), (3, 6)]:
        mlm_labels[row, col] = ids[row, col]
        mlm_ids[row, col] = VOCAB - 3  # the mask token
    return {
        "images": torch.randn(batch, 3, 32, 16, generator=gen),
        "caption_ids": ids,
        "pids": torch.tensor([0, 3, 0, 4])[:batch],
        "mlm_ids": mlm_ids,
        "mlm_labels": mlm_labels,
    }


def test_forward_returns_named_outputs():
    model = make_irra()
    batch = make_batch()
    out = model(batch)
    assert set(out) == {"image_feats", "text_feats", "image_logits", "text_logits", "mlm_scores", "mlm_targets"}
    assert out["image_feats"].shape == out["text_feats"].shape == (4, 64)
    assert out["image_logits"].shape == (4, 5) and out["mlm_scores"].shape == (6, VOCAB)
    assert out["mlm_targets"].tolist() == batch["mlm_labels"][batch["mlm_labels"] != 0].tolist()
    assert set(make_irra(("sdm",))(batch)) == {"image_feats", "text_feats"}


def test_forward_all_losses_and_backward():
    step = Trainable()
    model = step.model
    out = step(make_batch())
    assert set(out) == {"temperature", "itc_loss", "sdm_loss", "cmpm_loss", "id_loss", "img_acc", "txt_acc",
                        "mlm_loss", "mlm_acc"}
    assert all(torch.isfinite(v).all() for v in out.values())
    assert out["temperature"].item() == pytest.approx(0.02)
    sum(v for k, v in out.items() if k.endswith("_loss")).backward()
    for name in ("classifier.weight", "mlm_head.fc.weight", "cross_attn.in_proj_weight",
                 "cross_modal_transformer.resblocks.1.mlp.c_proj.weight", "base_model.visual.conv1.weight",
                 "base_model.token_embedding.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_losses_equal_objectives_on_pooled_features():
    step = Trainable(("sdm", "itc", "id"))
    model = step.model
    batch = make_batch()
    with torch.no_grad():
        out = step(batch)
        img, txt = model.encode_image(batch["images"]), model.encode_text(batch["caption_ids"])
        # end-of-text pooling: the token at the largest id
        text_tokens = model.base_model.encode_text(batch["caption_ids"])
        torch.testing.assert_close(txt, text_tokens[:, 7])
        torch.testing.assert_close(out["sdm_loss"], objectives.compute_sdm(img, txt, batch["pids"], 50.0))
        torch.testing.assert_close(out["itc_loss"], objectives.compute_itc(img, txt, 50.0))
        logits_i, logits_t = model.classifier(img), model.classifier(txt)
        torch.testing.assert_close(out["id_loss"], objectives.compute_id(logits_i, logits_t, batch["pids"]))
        expected_acc = (logits_i.argmax(1) == batch["pids"]).float().mean()
        torch.testing.assert_close(out["img_acc"], expected_acc)


def test_mlm_partial_projection_equals_full():
    step = Trainable(("mlm",))
    model = step.model
    batch = make_batch()
    with torch.no_grad():
        out = step(batch)
        image_tokens = model.base_model.encode_image(batch["images"])
        fused = model.cross_former(model.base_model.encode_text(batch["mlm_ids"]), image_tokens)
        scores = model.mlm_head(fused).float().reshape(-1, VOCAB)  # every position, as IRRA does
        labels = batch["mlm_labels"].reshape(-1)
        full_loss = F.cross_entropy(scores, labels, ignore_index=0)
        masked = labels.nonzero().squeeze(1)
        full_acc = (scores.argmax(1)[masked] == labels[masked]).float().mean()
    torch.testing.assert_close(out["mlm_loss"], full_loss)
    torch.testing.assert_close(out["mlm_acc"], full_acc)


def test_mlm_without_masked_tokens_is_zero():
    step = Trainable(("mlm",))
    batch = make_batch()
    batch["mlm_labels"] = torch.zeros_like(batch["mlm_labels"])
    out = step(batch)
    assert out["mlm_loss"].item() == 0.0 and out["mlm_acc"].item() == 0.0
    out["mlm_loss"].backward()


def test_loss_weights_scale_losses():
    batch = make_batch()
    with torch.no_grad():
        plain = Trainable(("id", "mlm", "sdm"))(batch)
        weighted = Trainable(("id", "mlm", "sdm"), weights={"id": 2.0, "mlm": 0.5})(batch)
    torch.testing.assert_close(weighted["id_loss"], 2 * plain["id_loss"])
    torch.testing.assert_close(weighted["mlm_loss"], 0.5 * plain["mlm_loss"])
    torch.testing.assert_close(weighted["sdm_loss"], plain["sdm_loss"])


def test_state_dict_layout_matches_irra():
    keys = set(make_irra().state_dict())
    assert not any("logit_scale" in k for k in keys)
    expected = {
        "classifier.weight", "classifier.bias",
        "cross_attn.in_proj_weight", "cross_attn.in_proj_bias",
        "cross_attn.out_proj.weight", "cross_attn.out_proj.bias",
        "ln_pre_t.weight", "ln_pre_t.bias", "ln_pre_i.weight", "ln_pre_i.bias", "ln_post.weight", "ln_post.bias",
        "mlm_head.dense.weight", "mlm_head.dense.bias", "mlm_head.ln.weight", "mlm_head.ln.bias",
        "mlm_head.fc.weight", "mlm_head.fc.bias",
    }
    for i in range(2):
        for suffix in ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
                       "ln_1.weight", "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
                       "mlp.c_proj.bias", "ln_2.weight", "ln_2.bias"):
            expected.add(f"cross_modal_transformer.resblocks.{i}.{suffix}")
    assert {k for k in keys if not k.startswith("base_model.")} == expected
    assert "base_model.visual.conv1.weight" in keys and "base_model.text_projection" in keys
    assert set(make_irra(("sdm",)).state_dict()) == {k for k in keys if k.startswith("base_model.")}


def test_head_initialisation():
    torch.manual_seed(0)
    model = IRRA(CLIP(CFG, (32, 16), 8), num_classes=400, with_id=True, with_mlm=True, cmt_depth=4, vocab_size=2000)
    scale = 64**-0.5
    proj_std, fc_std = scale * 8**-0.5, 128**-0.5

    def close(t, std):
        assert abs(t.std().item() / std - 1) < 0.1, (t.std().item(), std)

    close(model.classifier.weight, 0.001)
    assert model.classifier.bias.abs().sum() == 0
    close(model.cross_attn.in_proj_weight, scale)
    close(model.cross_attn.out_proj.weight, proj_std)
    close(model.cross_modal_transformer.resblocks[0].mlp.c_fc.weight, fc_std)
    close(model.cross_modal_transformer.resblocks[3].mlp.c_proj.weight, proj_std)
    close(model.mlm_head.dense.weight, fc_std)
    close(model.mlm_head.fc.weight, proj_std)


def test_save_load_reproduces_outputs(tmp_path):
    model = make_irra(seed=0).eval()
    batch = make_batch()
    torch.save(model.state_dict(), tmp_path / "irra.pth")
    restored = make_irra(seed=123).eval()
    restored.load_state_dict(torch.load(tmp_path / "irra.pth", weights_only=True), strict=True)
    with torch.no_grad():
        a, b = model(batch), restored(batch)
        for key in a:
            assert torch.equal(a[key], b[key]), key
        assert torch.equal(model.encode_image(batch["images"]), restored.encode_image(batch["images"]))
        assert torch.equal(model.encode_text(batch["caption_ids"]), restored.encode_text(batch["caption_ids"]))


def test_pooling_hooks_drive_encoders_and_losses():
    class MeanPooled(IRRA):
        def pool_image(self, image_tokens):
            return image_tokens.mean(dim=1).float(), {"image_extra": image_tokens.sum()}

    torch.manual_seed(0)
    model = MeanPooled(CLIP(CFG, (32, 16), 8), num_classes=5, with_id=False, with_mlm=False)
    batch = make_batch()
    with torch.no_grad():
        tokens = model.base_model.encode_image(batch["images"])
        torch.testing.assert_close(model.encode_image(batch["images"]), tokens.mean(1))
        txt = model.encode_text(batch["caption_ids"])
        expected = objectives.compute_sdm(tokens.mean(1), txt, batch["pids"], 50.0)
        outputs = model(batch)
        torch.testing.assert_close(outputs["image_extra"], tokens.sum())
        torch.testing.assert_close(IRRACriterion(("sdm",))(outputs, batch)["sdm_loss"], expected)


def test_bad_configuration_and_batches():
    with pytest.raises(UserError, match="Unknown loss name.*'foo'.*sdm"):
        IRRACriterion(("sdm", "foo"))
    with pytest.raises(UserError, match="--temperature"):
        IRRACriterion(("sdm",), temperature=0.0)
    with pytest.raises(UserError, match="num_classes=0"):
        IRRA(CLIP(CFG, (32, 16), 8), num_classes=0, with_id=True)
    with pytest.raises(UserError, match="--cmt_depth"):
        IRRA(CLIP(CFG, (32, 16), 8), num_classes=5, with_id=False, with_mlm=True, cmt_depth=0)
    model = make_irra(("sdm", "mlm"))
    batch = make_batch()
    del batch["mlm_labels"]
    with pytest.raises(UserError, match="lacks mlm_labels"):
        model(batch)
    batch = make_batch()
    batch["pids"] = torch.tensor([0, 1, 2, 5])
    with pytest.raises(UserError, match=r"\[0, 5\)"):
        Trainable(("id",))(batch)


def args_namespace(**overrides):
    base = dict(pretrain_choice="tiny", from_scratch=True, img_size=(32, 16), stride_size=16, loss_names="sdm + mlm+id",
                temperature=0.05, cmt_depth=1, vocab_size=49408, id_loss_weight=0.5, mlm_loss_weight=2.0,
                precision="fp32", device="cpu")
    base.update(overrides)
    return SimpleNamespace(**base)


def test_build_model_from_args():
    args = args_namespace()
    model = build_model(args, num_classes=7)
    criterion = build_criterion(args)
    assert criterion.losses == ("sdm", "mlm", "id") and model.classifier.out_features == 7
    assert criterion.weights == {"sdm": 1.0, "id": 0.5, "mlm": 2.0}
    assert criterion.logit_scale == pytest.approx(20.0) and len(model.cross_modal_transformer.resblocks) == 1
    assert model.base_model.config.embed_dim == 96
    with pytest.raises(UserError, match="Unknown loss"):
        build_criterion(args_namespace(loss_names="sdm+idd"))


def test_build_model_from_saved_weights_and_old_namespace(tmp_path):
    model = build_model(args_namespace(loss_names="sdm+id", vocab_size=VOCAB), num_classes=3)
    state = model.state_dict()
    # Evaluation: the architecture comes from the saved weights alone (no pretrained file is read).
    rebuilt = build_model(args_namespace(loss_names="sdm+id", pretrain_choice="/no/such/file"), 3, weights=state)
    assert rebuilt.base_model.config == model.base_model.config
    assert set(rebuilt.state_dict()) == set(state)
    with pytest.raises(UserError, match="not an IRRA-style checkpoint"):
        build_model(args_namespace(loss_names="sdm"), 3, weights={"foo.weight": torch.zeros(1)})
    # A namespace saved by IRRA itself: no model / from_scratch / precision; a checkpoint path loads its weights.
    path = tmp_path / "clip.pt"
    save_openai_checkpoint(model.base_model, path)
    old = args_namespace(pretrain_choice=str(path), loss_names="itc", vocab_size=VOCAB)
    del old.from_scratch, old.precision
    loaded = build_model(old)
    assert loaded.base_model.dtype == torch.float32
    assert torch.equal(loaded.base_model.text_projection, model.base_model.text_projection)


def test_fp16_weights_run_on_cpu():
    from model import convert_weights_to_fp16

    model = convert_weights_to_fp16(make_irra())
    params = dict(model.named_parameters())
    assert params["classifier.weight"].dtype == torch.float16
    assert params["cross_attn.in_proj_weight"].dtype == torch.float16
    assert params["mlm_head.fc.weight"].dtype == torch.float16
    assert params["ln_post.weight"].dtype == params["mlm_head.ln.weight"].dtype == torch.float32
    assert params["base_model.ln_final.weight"].dtype == torch.float32
    batch = make_batch()
    out = IRRACriterion(ALL_LOSSES)(model(batch), batch)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())
    sum(v for k, v in out.items() if k.endswith("_loss")).backward()


def test_masked_caption_is_encoded_once_with_identical_losses_and_gradients():
    """IRRA's default feeds the masked caption to every loss; encoding it once must change nothing."""
    batch = make_batch()
    batch["caption_ids"] = batch["mlm_ids"].clone()  # what the faithful data pipeline produces

    def losses_and_grads(model):
        out = IRRACriterion(ALL_LOSSES)(model(batch), batch)
        total = sum(v for k, v in out.items() if k.endswith("_loss"))
        total.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    shared = make_irra(seed=3)
    calls = []
    shared.base_model.transformer.register_forward_hook(lambda *a: calls.append(1))
    out_once, grads_once = losses_and_grads(shared)
    assert len(calls) == 1

    twice = make_irra(seed=3)
    original_equal = torch.equal
    try:  # make the model believe the texts differ, so it encodes the caption a second time
        torch.equal = lambda a, b: False
        out_twice, grads_twice = losses_and_grads(twice)
    finally:
        torch.equal = original_equal
    for key in ("sdm_loss", "id_loss", "mlm_loss", "itc_loss"):
        torch.testing.assert_close(out_once[key], out_twice[key])
    assert grads_once.keys() == grads_twice.keys()
    for name in grads_once:
        # the same sums in another order: equal up to float32 rounding
        torch.testing.assert_close(grads_once[name], grads_twice[name], rtol=1e-4, atol=1e-4)
