"""IVT's weights: tiny random timm ViT and Hugging Face BERT checkpoints, saved and mapped, land where they belong;
IVT's released key layout loads (strictly for trained models, as released for the pre-training checkpoint)."""
import argparse

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

from model.ivt import IVT, IVTConfig, add_ivt_arguments, build_ivt_model
from model.ivt_weights import (
    convert_bert_state_dict,
    convert_ivt_state_dict,
    is_ivt_pretraining_state,
    is_ivt_released_state,
    load_bert_weights,
    load_ivt_release,
    load_vit_weights,
    read_bert_folder,
    read_weights_file,
    resize_pos_embed,
)
from utils.errors import UserError
from utils.tokenizers import build_wordpiece_vocab, load_hf_tokenizer

WIDTH, DEPTH, HEADS = 32, 2, 2


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                            img_size=32, patch_size=8, num_classes=5)
    with torch.no_grad():  # timm starts some tensors at zero: make every one distinctive
        for tensor in vit.state_dict().values():
            tensor.normal_(0, 0.1)
    return vit.eval()


def tiny_bert(seed=0, **overrides):
    torch.manual_seed(seed)
    fields = dict(vocab_size=40, hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                  intermediate_size=4 * WIDTH, max_position_embeddings=24, hidden_act="gelu")
    fields.update(overrides)
    return transformers.BertModel(transformers.BertConfig(**fields), add_pooling_layer=False).eval()


def ivt(img_size=(32, 32), stride=8, vocab_size=40, seed=1):
    torch.manual_seed(seed)
    config = IVTConfig(width=WIDTH, depth=DEPTH, heads=HEADS, patch_size=8, stride=stride, img_size=img_size,
                       vocab_size=vocab_size, max_text_positions=24, drop_path=0.0)
    return IVT(config).eval()


def released_keys(depth):
    """The trained model's state-dict names in the released code (make_model_vl.py, vit_vl.py)."""
    keys = ["temp", "classifier_img.weight", "bottleneck_img.weight", "bottleneck_img.bias",
            "bottleneck_img.running_mean", "bottleneck_img.running_var", "bottleneck_img.num_batches_tracked"]
    enc = ["embeddings.position_ids", "embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
           "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias",
           "cls_token", "pos_embed", "type_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
           "norm.weight", "norm.bias"]
    for i in range(depth):
        for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp_vis.fc1", "mlp_vis.fc2", "mlp_txt.fc1",
                     "mlp_txt.fc2"):
            enc += [f"blocks.{i}.{name}.weight", f"blocks.{i}.{name}.bias"]
    return keys + ["encoder_vl." + k for k in enc]


def released_state(model, num_classes=6, prefix="module."):
    """A state dict in the released layout holding ``model``'s weights (plus the entries IVT never uses)."""
    ours = model.state_dict()
    state = {}
    for key in released_keys(model.config.depth):
        if key in ours:
            state[key] = ours[key].clone()
    width = model.config.width
    state.update({"temp": torch.tensor(0.5), "classifier_img.weight": torch.randn(num_classes, width),
                  "bottleneck_img.weight": torch.ones(width), "bottleneck_img.bias": torch.zeros(width),
                  "bottleneck_img.running_mean": torch.zeros(width),
                  "bottleneck_img.running_var": torch.ones(width),
                  "bottleneck_img.num_batches_tracked": torch.tensor(3),
                  "encoder_vl.embeddings.position_ids": torch.arange(24).unsqueeze(0)})
    assert sorted(state) == sorted(released_keys(model.config.depth))
    return {prefix + k: v for k, v in state.items()}


def test_vit_weights_land_where_they_belong(tmp_path):
    vit = tiny_vit()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    model = ivt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_vit_weights(model, str(path), model.config.grid)
    ours, source = model.state_dict(), vit.state_dict()
    filled = set()
    for key, value in source.items():
        if key.startswith("head."):
            continue
        target = "encoder_vl." + key.replace(".mlp.", ".mlp_vis.")
        assert torch.equal(ours[target], value), key
        filled.add(target)
    for key, value in ours.items():  # everything else is untouched: BERT's parts and the image-type embedding
        if key not in filled:
            assert torch.equal(value, before[key]), key
            assert key.endswith("type_embed") or ".mlp_txt." in key or ".embeddings." in key, key
    # The image path equals timm's ViT once the image-type embedding (IVT's only addition) is zero.
    with torch.no_grad():
        model.encoder_vl.type_embed.zero_()
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.encode_image(images), vit.forward_features(images)[:, 0], atol=1e-5)


def test_vit_position_embedding_is_resized_to_the_stride_grid(tmp_path):
    vit = tiny_vit()
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    model = ivt(img_size=(40, 24), stride=6)
    assert model.config.grid == (6, 3)
    load_vit_weights(model, str(path), model.config.grid)
    source = vit.pos_embed.detach()
    # The released resize: class position kept, the 4x4 grid interpolated bilinearly (no antialiasing) to 6x3.
    grid = source[:, 1:].reshape(1, 4, 4, WIDTH).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(6, 3), mode="bilinear", align_corners=False)
    expected = torch.cat([source[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 18, WIDTH)], dim=1)
    assert torch.allclose(model.encoder_vl.pos_embed, expected, atol=1e-6)
    assert torch.equal(resize_pos_embed(source, (4, 4)), source)
    with pytest.raises(UserError, match="not 1 \\+ a square grid"):
        resize_pos_embed(torch.zeros(1, 1 + 12, WIDTH), (2, 2))


def test_bert_weights_land_where_they_belong(tmp_path):
    bert = tiny_bert()
    bert.save_pretrained(tmp_path / "bert")
    loaded = read_bert_folder(str(tmp_path / "bert"))
    model = ivt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_bert_weights(model, loaded)
    enc, ours = model.encoder_vl, model.state_dict()
    ids = torch.randint(0, 40, (3, 9))
    with torch.no_grad():
        assert torch.allclose(enc.embeddings(input_ids=ids), bert.embeddings(input_ids=ids), atol=1e-6)
        x = torch.randn(3, 9, WIDTH)
        for i, layer in enumerate(bert.encoder.layer):
            assert torch.allclose(enc.blocks[i].mlp_txt(x), layer.output.dense(layer.intermediate(x)), atol=1e-6)
    for key, value in ours.items():  # the image side and the shared layers are untouched
        if ".mlp_txt." not in key and ".embeddings." not in key:
            assert torch.equal(value, before[key]), key


def test_bert_pretraining_layout_maps_the_same(tmp_path):
    masked_lm = transformers.BertForMaskedLM(tiny_bert().config)
    prefixed = convert_bert_state_dict(masked_lm.state_dict())
    plain = convert_bert_state_dict(masked_lm.bert.state_dict())
    assert sorted(prefixed) == sorted(plain) and all(torch.equal(prefixed[k], plain[k]) for k in plain)
    assert len(plain) == 5 + 4 * DEPTH  # embeddings (3 tables + LayerNorm) and fc1/fc2 per layer


def ivt_args(*argv, img_size=(40, 24), stride=6):
    parser = argparse.ArgumentParser()
    add_ivt_arguments(parser.add_argument_group("ivt"))
    parser.add_argument("--tokenizer_dir", default="")  # a shared option of the data group
    args = parser.parse_args(["--ivt_width", str(WIDTH), "--ivt_depth", str(DEPTH), "--ivt_heads", str(HEADS), *argv])
    args.img_size, args.stride_size, args.text_length = img_size, stride, 16
    return args


def test_build_ivt_model_from_weight_files(tmp_path):
    vit, bert = tiny_vit(), tiny_bert(max_position_embeddings=30)
    torch.save({"model": vit.state_dict()}, tmp_path / "vit.pth")
    bert.save_pretrained(tmp_path / "bert")
    args = ivt_args("--vit_weights", str(tmp_path / "vit.pth"), "--bert_weights", str(tmp_path / "bert"))
    # A patch size of 8 is not a flag (IVT is ViT-B/16): the 16-pixel model does not take this ViT.
    with pytest.raises(UserError, match="patch_embed.proj.weight"):
        build_ivt_model(args)
    args.vit_weights = ""
    model = build_ivt_model(args)  # the text side's sizes come from BERT's config
    assert model.config.vocab_size == 40 and model.config.max_text_positions == 30
    assert torch.equal(model.encoder_vl.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    args.tokenizer_dir = build_wordpiece_vocab(["a man in a red coat"] * 3, str(tmp_path / "vocab"), vocab_size=30)
    with pytest.raises(UserError, match="use BERT's own vocab.txt"):
        build_ivt_model(args)
    with pytest.raises(UserError, match="use BERT's own vocab.txt"):
        build_ivt_model(args, 0, None, load_hf_tokenizer("wordpiece", args.tokenizer_dir))
    args.bert_weights = ""
    size = load_hf_tokenizer("wordpiece", args.tokenizer_dir).vocab_size
    assert build_ivt_model(args).config.vocab_size == size < 30
    args.tokenizer_dir = ""
    assert build_ivt_model(args).config.vocab_size == 2000  # at most --wordpiece_vocab_size ids from the captions


LONG_CAPTION = "a young woman with black hair wears a pink jacket, grey skirt and quite fancy brown boots"


def test_evaluation_model_is_read_from_the_weights(tmp_path):
    trained = ivt(img_size=(40, 24), stride=6, vocab_size=37, seed=9)
    args = ivt_args("--vit_weights", "absent.pth", "--drop_path", "0")  # nothing pretrained is loaded
    model = build_ivt_model(args, 0, trained.state_dict())
    assert model.config == trained.config
    small = load_hf_tokenizer("wordpiece", build_wordpiece_vocab(["a man"], str(tmp_path / "v"), vocab_size=30))
    assert build_ivt_model(args, 0, trained.state_dict(), small).config.vocab_size == 37
    big = load_hf_tokenizer("wordpiece", build_wordpiece_vocab([LONG_CAPTION], str(tmp_path / "b"), vocab_size=60))
    with pytest.raises(UserError, match="the tokenizer the run was trained with"):
        build_ivt_model(args, 0, trained.state_dict(), big)
    with pytest.raises(UserError, match="use the stride and image size it was trained with"):
        build_ivt_model(ivt_args(stride=8), 0, trained.state_dict())
    with pytest.raises(UserError, match="does not hold IVT weights"):
        build_ivt_model(args, 0, {"base_model.positional_embedding": torch.zeros(3)})


def test_released_trained_checkpoint_loads_strictly(tmp_path):
    source = ivt(seed=5)
    path = tmp_path / "checkpoint_best.pth"
    # As the released trainer saves it: DDP prefix, optimizer, epoch, and a numpy float accuracy.
    torch.save({"state_dict": released_state(source), "optimizer": {}, "epoch": 7,
                "best_acc": np.float64(61.5)}, path)
    state = read_weights_file(str(path), "--ivt_checkpoint")
    assert is_ivt_released_state(state) and not is_ivt_pretraining_state(state)
    assert not is_ivt_released_state(source.state_dict())  # our own checkpoints are not mistaken for it
    assert sorted(convert_ivt_state_dict(state)) == sorted(source.state_dict())
    model = ivt(seed=6)
    load_ivt_release(model, state, str(path))
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(1, 40, (2, 7))
    assert torch.equal(model.encode_image(images), source.encode_image(images))
    assert torch.equal(model.encode_text(ids), source.encode_text(ids))
    broken = {k: v for k, v in state.items() if "blocks.1.mlp_txt.fc2.bias" not in k}
    with pytest.raises(UserError, match="missing key"):
        load_ivt_release(ivt(), broken, "broken.pth")
    with pytest.raises(UserError, match="shape mismatch"):
        load_ivt_release(ivt(img_size=(32, 16)), state, str(path))


def test_released_pretraining_checkpoint_loads_as_released():
    # Pre-trained at stride 8 on 32x32 (grid 4x4); fine-tuned at stride 6 (grid 5x5): the position and type
    # embeddings do not fit and are skipped, the rest loads; the fusion encoder and matching head are ignored.
    pretrained = ivt(seed=7)
    state = released_state(pretrained, prefix="module.")
    for key in ("module.classifier_img.weight", "module.bottleneck_img.weight"):
        state.pop(key)
    state["module.encoder_fusion.bert.embeddings.word_embeddings.weight"] = torch.randn(40, WIDTH)
    state["module.itm.weight"] = torch.randn(2, WIDTH)
    assert is_ivt_pretraining_state(state) and is_ivt_released_state(state)
    model = ivt(stride=6, seed=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_ivt_release(model, state, "pretrain.pth")
    for key, value in model.state_dict().items():
        if key.endswith(("pos_embed", "type_embed")):
            assert torch.equal(value, before[key]), key
        else:
            assert torch.equal(value, pretrained.state_dict()[key]), key


def test_missing_and_bad_weight_files_name_what_to_download(tmp_path):
    with pytest.raises(UserError, match="vit_base_patch16_224.orig_in21k_ft_in1k"):
        read_weights_file(str(tmp_path / "absent.pth"), "--vit_weights")
    with pytest.raises(UserError, match="bert-base-uncased"):
        read_bert_folder(str(tmp_path))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not be read"):
        read_weights_file(str(tmp_path / "garbage.pth"), "--ivt_checkpoint")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(UserError, match="holds no state dict"):
        read_weights_file(str(tmp_path / "list.pth"), "--ivt_checkpoint")
    wide = timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=48, depth=DEPTH, num_heads=HEADS,
                             img_size=32, patch_size=8)
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    model = ivt()
    with pytest.raises(UserError, match="does not fit the IVT model \\(shape mismatch"):
        load_vit_weights(model, str(tmp_path / "wide.pth"), model.config.grid)
    tiny_bert(intermediate_size=64).save_pretrained(tmp_path / "narrow")
    with pytest.raises(UserError, match="intermediate size"):
        load_bert_weights(model, read_bert_folder(str(tmp_path / "narrow")))
