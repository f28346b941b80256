"""Tests for model/biirra_weights.py: tiny checkpoints written in CCLM-X2VLM's key layout and an XLM-R folder
written by ``save_pretrained`` load tensor by tensor, and the loaded parts compute what their sources compute."""

import argparse

import pytest
import timm
import torch
from torch import nn
from transformers import BertConfig, XLMRobertaForMaskedLM, XLMRobertaModel
from transformers.models.bert.modeling_bert import BertLayer

from model import biirra_net as B
from model.biirra import add_biirra_arguments
from model import biirra_weights as W
from tests.biirra_helpers import VOCAB, tiny_batch, tiny_config, tiny_model
from utils.errors import UserError

WIDTH = 32


class CclmSource(nn.Module):
    """The parts of a CCLM-X2VLM checkpoint, at tiny sizes, with the published module names."""

    def __init__(self, config: B.BiIrraConfig) -> None:
        super().__init__()
        vision, text, fusion = config.vision, config.text, config.fusion
        self.vision_encoder = timm.create_model(
            "beitv2_base_patch16_224", pretrained=False, num_classes=0, img_size=vision.img_size,
            patch_size=vision.patch_size, embed_dim=vision.width, depth=vision.layers, num_heads=vision.heads)
        self.text_encoder = XLMRobertaModel(text.hf_config(), add_pooling_layer=False)
        cross = BertConfig(hidden_size=text.width, num_attention_heads=fusion.heads,
                           intermediate_size=fusion.intermediate, layer_norm_eps=fusion.layer_norm_eps,
                           is_decoder=True, add_cross_attention=True)
        cross._attn_implementation = "eager"
        self.cross_layers = nn.ModuleList([BertLayer(cross) for _ in range(fusion.layers)])
        self.vision_proj = nn.Linear(text.width, config.embed_dim)
        self.text_proj = nn.Linear(text.width, config.embed_dim)
        self.itm_head = B.build_mlp(text.width, 2)
        self.temp = nn.Parameter(torch.tensor(0.05))
        for p in self.parameters():  # away from any default initialisation, so that a skipped tensor shows
            nn.init.normal_(p, std=0.3)

    def checkpoint(self, single_stack: bool = False) -> dict:
        state = {}
        for prefix in ("vision_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head"):
            state.update({f"{prefix}.{k}": v for k, v in getattr(self, prefix).state_dict().items()})
        state["temp"] = self.temp.detach().clone()
        n_text = self.text_encoder.config.num_hidden_layers
        for i, layer in enumerate(self.cross_layers):
            name = f"text_encoder.encoder.layer.{n_text + i}" if single_stack else f"cross_encoder.encoder.layer.{i}"
            state.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
        # Tensors the published file holds that Bi-IRRA does not use.
        state["vision_encoder.blocks.0.attn.relative_position_index"] = torch.zeros(3, 3, dtype=torch.long)
        state["text_encoder.embeddings.position_ids"] = torch.arange(24)[None]
        state["mlm_head.predictions.transform.dense.weight"] = torch.randn(WIDTH, WIDTH)
        state["mlm_head.predictions.decoder.weight"] = torch.randn(VOCAB, WIDTH)
        state["bbox_head.0.weight"] = torch.randn(2 * WIDTH, WIDTH)
        return {"model": state, "config": {"embed_dim": 16, "temp": 0.07}}

    def fuse(self, queries, query_mask, context, context_mask):
        """The source's fusion stack with explicit non-causal masks."""
        x = queries
        for layer in self.cross_layers:
            x = layer(x, B.additive_mask(query_mask, x.dtype), context, B.additive_mask(context_mask, x.dtype))
        return x

    def image_tokens(self, images):
        x = self.vision_encoder.forward_features(images)  # norm is the identity with mean pooling
        patches = self.vision_encoder.fc_norm(x[:, 1:])
        return torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    config = tiny_config(width=WIDTH)
    return config, CclmSource(config).eval(), tiny_model(seed=1, width=WIDTH).eval()


@pytest.mark.parametrize("single_stack", [False, True])
def test_cclm_checkpoint_maps_tensor_by_tensor_and_computes_as_its_source(setup, tmp_path, single_stack):
    config, source, model = setup
    ckpt = source.checkpoint(single_stack)
    path = tmp_path / "cclm.th"
    torch.save(ckpt, path)
    assert W.is_cclm_x2vlm_state_dict(ckpt)
    absent = W.load_cclm_x2vlm(model, str(path))
    assert absent and all(k.startswith(W.CCLM_ABSENT_PREFIXES) for k in absent)
    own = model.state_dict()
    mapped = W.convert_cclm_x2vlm_state_dict(ckpt)
    assert not any(k.startswith(("mlm_head", "bbox_head")) or "relative_position_index" in k for k in mapped)
    for key, value in mapped.items():
        assert torch.equal(own[key], value), key
    n_fusion = sum(1 for k in mapped if k.startswith("fusion.layer."))
    assert n_fusion == len(list(model.fusion.parameters())) and n_fusion > 0
    torch.testing.assert_close(model.text_proj_target.weight, model.text_proj.weight)
    assert model.temp.item() == pytest.approx(source.temp.item())

    batch = tiny_batch(config)
    ids, mask = batch[B.keyed(B.CAPTION_IDS, "en")], batch[B.keyed(B.ATTENTION_MASK, "en")].bool()
    with torch.no_grad():
        image = source.image_tokens(batch[B.IMAGES])
        torch.testing.assert_close(model.image_tokens(batch[B.IMAGES]), image)
        text = source.text_encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        torch.testing.assert_close(model.text_tokens(ids, mask), text)
        ones = torch.ones(image.shape[:2], dtype=torch.bool)
        fused = source.fuse(text, mask, image, ones)
        torch.testing.assert_close(model.fusion(text, mask, image, None), fused)
        torch.testing.assert_close(model.match_logits(text, mask, image), source.itm_head(fused[:, 0]))
        # The other direction (image queries, text context) is the same stack.
        torch.testing.assert_close(model.fusion(image, None, text, mask), source.fuse(image, ones, text, mask))
        torch.testing.assert_close(model.encode_image(batch[B.IMAGES]),
                                   nn.functional.normalize(source.vision_proj(image[:, 0]), dim=-1))


def test_bad_cclm_checkpoints_are_user_errors(setup, tmp_path):
    config, source, model = setup
    with pytest.raises(UserError, match="does not exist"):
        W.load_cclm_x2vlm(model, str(tmp_path / "missing.th"))
    junk = tmp_path / "junk.th"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        W.load_cclm_x2vlm(model, str(junk))
    with pytest.raises(UserError, match="does not look like a CCLM-X2VLM"):
        W.load_cclm_x2vlm(model, {"model": {"visual.proj": torch.zeros(1)}})
    ckpt = source.checkpoint()
    lacking = {k: v for k, v in ckpt["model"].items() if k != "vision_encoder.blocks.1.mlp.fc1.weight"}
    with pytest.raises(UserError, match="lacks 1 tensor"):
        W.load_cclm_x2vlm(model, lacking)
    extra = dict(ckpt["model"], **{"cross_encoder.encoder.layer.9.output.dense.bias": torch.zeros(WIDTH)})
    with pytest.raises(UserError, match="no place for"):
        W.load_cclm_x2vlm(model, extra)
    other_vocab = dict(ckpt["model"])
    other_vocab["text_encoder.embeddings.word_embeddings.weight"] = torch.zeros(VOCAB + 5, WIDTH)
    with pytest.raises(UserError, match=r"word_embeddings.weight has shape \(45, 32\)"):
        W.load_cclm_x2vlm(model, other_vocab)
    assert not W.is_cclm_x2vlm_state_dict({"model": {"visual.proj": torch.zeros(1)}})


def write_xlmr(folder, config: B.BiIrraConfig, seed: int = 3) -> XLMRobertaForMaskedLM:
    torch.manual_seed(seed)
    source = XLMRobertaForMaskedLM(config.text.hf_config()).eval()
    source.save_pretrained(folder)
    return source


def test_xlmr_folder_loads_encoder_and_language_model_head(setup, tmp_path):
    config, _, model = setup
    source = write_xlmr(tmp_path / "xlmr", config)
    W.load_xlmr_folder(model, str(tmp_path / "xlmr"))
    own = model.text_encoder.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(own[key], value), key
    batch = tiny_batch(config)
    ids, mask = batch[B.keyed(B.MLM_IDS, "en")], batch[B.keyed(B.ATTENTION_MASK, "en")]
    with torch.no_grad():
        torch.testing.assert_close(model.text_encoder(input_ids=ids, attention_mask=mask).logits,
                                   source(input_ids=ids, attention_mask=mask).logits)


def test_bad_xlmr_folders_are_user_errors(setup, tmp_path):
    config, _, model = setup
    with pytest.raises(UserError, match="does not exist"):
        W.load_xlmr_folder(model, str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        W.load_xlmr_folder(model, str(tmp_path / "empty"))
    folder = tmp_path / "xlmr"
    write_xlmr(folder, config)
    for name in W.XLMR_WEIGHT_FILES:
        if (folder / name).exists():
            (folder / name).rename(folder / (name + ".away"))
    with pytest.raises(UserError, match="has no weights"):
        W.load_xlmr_folder(model, str(folder))
    bigger = tiny_config(width=48)
    write_xlmr(tmp_path / "wide", bigger)
    with pytest.raises(UserError, match="do not fit the text encoder"):
        W.load_xlmr_folder(model, str(tmp_path / "wide"))


def test_builder_takes_the_text_sizes_from_the_xlmr_folder(tmp_path):
    config = tiny_config(width=WIDTH)
    source = write_xlmr(tmp_path / "xlmr", config)
    parser = argparse.ArgumentParser()
    add_biirra_arguments(parser.add_argument_group("Bi-IRRA"))
    args = parser.parse_args(["--biirra_arch", "tiny", "--xlmr_dir", str(tmp_path / "xlmr")])
    args.img_size = (32, 32)
    # The tiny architecture's vision width is 64: the folder's text width 32 does not fit it.
    with pytest.raises(UserError, match="must equal the text width"):
        B.build_biirra_model(args)

    class WrongTokenizer:
        vocab_size = VOCAB + 1

    with pytest.raises(UserError, match=f"the tokenizer has {VOCAB + 1} ids"):
        B.build_biirra_config(args, WrongTokenizer())
    assert B.build_biirra_config(args).text == B.BiIrraTextCfg.from_hf_config(source.config)
