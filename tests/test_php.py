"""Tests for PHP's modules (model/moe.py, model/php.py) against small naive implementations."""

import logging
import math
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import datasets  # noqa: F401  (registers the data options)
from model import IRRA, build_criterion, build_model
from model.clip_model import CLIP, CLIPConfig, CLIPTextCfg, CLIPVisionCfg
from model.moe import MixtureOfAdapters, ResidualAdapter, load_balancing_loss
from model.php import PHP_METHOD
from model.php import (
    PHP,
    ExpertParsingTransformer,
    PartTokenMapping,
    PHPCriterion,
    format_expert_load,
    php_loss_weights,
)
from model import objectives
from utils.checkpoint import Checkpointer, load_model_state
from utils.errors import UserError

VOCAB = 60
CFG = CLIPConfig(
    embed_dim=16,
    vision=CLIPVisionCfg(patch_size=8, width=16, layers=1, heads=1),
    text=CLIPTextCfg(context_length=10, vocab_size=VOCAB, width=16, layers=1, heads=1),
)


# ------------------------------------------------------------------ naive references (loops, no nn modules)
def naive_layer_norm(x, ln):
    mean = sum(x) / len(x)
    var = sum((v - mean) ** 2 for v in x) / len(x)
    scaled = [(v - mean) / math.sqrt(var + ln.eps) for v in x]
    return [s * w + b for s, w, b in zip(scaled, ln.weight.tolist(), ln.bias.tolist())]


def naive_linear(x, lin):
    weight = lin.weight.tolist()
    bias = lin.bias.tolist() if lin.bias is not None else [0.0] * len(weight)
    return [sum(w * v for w, v in zip(row, x)) + b for row, b in zip(weight, bias)]


def naive_gelu(x):
    return [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x]


def naive_softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def naive_adapter(expert, x):
    """x + up(GELU(down(LN(x)))) on a list of floats (eval mode: no dropout)."""
    h = naive_gelu(naive_linear(naive_layer_norm(x, expert.norm), expert.down))
    return [a + b for a, b in zip(x, naive_linear(h, expert.up))]


def naive_moe(moe, tokens, task):
    """tokens: list of T lists [D]. Returns (outputs, aux, counts) computed token by token."""
    alpha = moe.alpha.item()
    task_logits = naive_linear(task, moe.task_gate)
    outputs, probs, picks = [], [], []
    counts = [0] * moe.num_experts
    for x in tokens:
        logits = [(1 - alpha) * a + alpha * b for a, b in zip(naive_linear(x, moe.input_gate), task_logits)]
        chosen = sorted(range(moe.num_experts), key=lambda e: -logits[e])[: moe.topk]
        weights = naive_softmax([logits[e] for e in chosen])
        y = [0.0] * len(x)
        for weight, e in zip(weights, chosen):
            y = [acc + weight * v for acc, v in zip(y, naive_adapter(moe.experts[e], x))]
            counts[e] += 1
        outputs.append(y)
        probs.append(naive_softmax(logits))
        picks.append([1.0 if e in chosen else 0.0 for e in range(moe.num_experts)])
    num = len(tokens)
    mean_p = [sum(p[e] for p in probs) / num for e in range(moe.num_experts)]
    mean_f = [sum(f[e] for f in picks) / num for e in range(moe.num_experts)]
    aux = moe.num_experts * sum(p * f for p, f in zip(mean_p, mean_f)) / moe.num_experts
    return outputs, aux, counts


def naive_crfm(crfm, x):
    """x: list over tokens of lists [D] (one sample) -> list over parts of lists [D]."""
    dim = len(x[0])
    parts = []
    for token in crfm.part_tokens.tolist():
        attn = naive_softmax([sum(p * v for p, v in zip(token, row)) for row in x])
        z = [sum(a * row[d] for a, row in zip(attn, x)) / math.sqrt(dim) for d in range(dim)]
        ln, fc1, fc2 = crfm.feed[0], crfm.feed[1], crfm.feed[4]
        parts.append(naive_linear(naive_gelu(naive_linear(naive_layer_norm(z, ln), fc1)), fc2))
    return parts


def randomise_(module, seed=0):
    """Give every parameter (including zero-initialised expert up-projections) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return module


# ------------------------------------------------------------------ moe.py
def test_adapter_init_is_identity_and_matches_naive():
    torch.manual_seed(0)
    adapter = ResidualAdapter(16, reduction=4).eval()
    assert adapter.down.weight.shape == (4, 16) and adapter.up.weight.shape == (16, 4)
    assert adapter.down.bias.abs().sum() == 0 and adapter.up.weight.abs().sum() == 0
    bound = 1 / math.sqrt(16)  # Kaiming-uniform with a = sqrt(5) over fan_in 16
    assert adapter.down.weight.abs().max() <= bound and adapter.down.weight.std() > 0.3 * bound
    x = torch.randn(3, 16)
    torch.testing.assert_close(adapter(x), x)
    randomise_(adapter)
    expected = torch.tensor([naive_adapter(adapter, row) for row in x.tolist()])
    torch.testing.assert_close(adapter(x), expected, rtol=1e-4, atol=1e-5)


def test_moe_matches_naive_routing_weights_aux_and_counts():
    torch.manual_seed(1)
    moe = randomise_(MixtureOfAdapters(8, num_experts=4, topk=2, reduction=2), seed=1)
    task = torch.randn(8)
    x = torch.randn(2, 5, 8)
    moe.train()
    for expert in moe.experts:  # dropout off, counting on
        expert.dropout.p = 0.0
    y, aux = moe(x, task)
    outputs, naive_aux, counts = naive_moe(moe, x.reshape(-1, 8).tolist(), task.tolist())
    torch.testing.assert_close(y, torch.tensor(outputs).view(2, 5, 8), rtol=1e-4, atol=1e-5)
    assert aux.dtype == torch.float32 and aux.item() == pytest.approx(naive_aux, rel=1e-5)
    assert moe.expert_counts.tolist() == counts and sum(counts) == 10 * 2
    moe.eval()
    moe(x, task)
    assert moe.expert_counts.tolist() == counts  # evaluation is not counted
    moe.reset_counts()
    assert moe.expert_counts.sum() == 0


def test_aux_hand_computed():
    # Two experts, top-1, every token has logits [ln 3, 0]: softmax [0.75, 0.25], all choose expert 0.
    moe = MixtureOfAdapters(4, num_experts=2, topk=1, reduction=2).train()
    with torch.no_grad():
        moe.input_gate.weight.zero_()
        moe.task_gate.weight.zero_()
        moe.task_gate.weight[0, 0] = 2 * math.log(3)  # alpha = 0.5 halves it
    task = torch.tensor([1.0, 0.0, 0.0, 0.0])
    x = torch.randn(3, 4)
    y, aux = moe(x, task)
    assert aux.item() == pytest.approx(2 * (0.75 * 1 + 0.25 * 0) / 2)
    assert moe.expert_counts.tolist() == [3, 0]
    torch.testing.assert_close(y, moe.experts[0](x))
    # With topk == num_experts every expert is always picked: aux = E * mean(P) = 1 for any logits.
    logits = torch.randn(7, 3)
    assert load_balancing_loss(logits, logits.topk(3).indices, 3).item() == pytest.approx(1.0)


def test_gradients_reach_only_the_selected_experts():
    torch.manual_seed(2)
    moe = randomise_(MixtureOfAdapters(8, num_experts=4, topk=2, reduction=2), seed=2).eval()
    with torch.no_grad():
        moe.input_gate.weight.mul_(0.01)
        moe.task_gate.weight.zero_()
        moe.task_gate.weight[:, 0] = torch.tensor([20.0, -20.0, 16.0, -20.0])
    task = torch.zeros(8)
    task[0] = 1.0
    y, _ = moe(torch.randn(3, 4, 8), task)
    y.square().sum().backward()
    for index, expert in enumerate(moe.experts):
        grads = [p.grad for p in expert.parameters()]
        if index in (0, 2):
            assert all(g is not None and g.abs().sum() > 0 for g in grads), index
        else:  # never selected: the expert ran on no token, so every gradient is zero
            assert all(g is None or g.abs().sum() == 0 for g in grads), index
    assert moe.alpha.grad is not None and moe.input_gate.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ php.py modules
def test_crfm_matches_naive():
    torch.manual_seed(3)
    crfm = PartTokenMapping(8, num_parts=3).eval()
    assert crfm.part_tokens.std().item() == pytest.approx(math.sqrt(2 / 8), rel=0.5)  # Kaiming-normal, fan_in D
    x = torch.randn(2, 5, 8)
    out = crfm(x)
    assert out.shape == (2, 3, 8)
    expected = torch.tensor([naive_crfm(crfm, sample) for sample in x.tolist()])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def reference_efp(efp, x, across_batch):
    """The released EFP forward with torch.nn.MultiheadAttention, which reads its input as [seq, batch, D].

    ``across_batch`` feeds [B, P, D] as the released code does (attention over B); otherwise per sample.
    """
    total_aux = 0.0
    for block in efp.resblocks:
        mha = nn.MultiheadAttention(efp.width, block.attn.heads, batch_first=not across_batch)
        mha.load_state_dict(block.attn.state_dict())
        h = block.ln_1(x)
        x = x + mha(h, h, h, need_weights=False)[0]
        tokens = block.ln_3(x).reshape(-1, x.shape[-1]).tolist()
        y, aux, _ = naive_moe(block.feed_forward, tokens, block.comb_param.tolist())
        x = x + block.mlp(block.ln_2(x)) + torch.tensor(y).view_as(x)
        total_aux += aux
    return x, total_aux


@pytest.mark.parametrize("mode", ["tokens", "batch"])
def test_efp_matches_released_layer_semantics(mode):
    torch.manual_seed(4)
    efp = randomise_(ExpertParsingTransformer(8, layers=2, heads=2, num_experts=3, topk=2, reduction=2,
                                              attention=mode), seed=4).eval()
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        out, aux = efp(x)
        expected, expected_aux = reference_efp(efp, x, across_batch=mode == "batch")
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert aux.item() == pytest.approx(expected_aux, rel=1e-4)


def make_php(losses=("sdm", "itc", "aux", "id"), seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(num_parts=3, num_experts=3, topk=2, reduction=4, moe_layers=2, moe_heads=2)
    options.update(kwargs)
    return PHP(CLIP(CFG, (32, 16), 8), num_classes=5, with_id="id" in losses, with_mlm="mlm" in losses,
               vocab_size=VOCAB, **options)


def php_step(model, batch, losses=("sdm", "itc", "aux", "id")):
    """PHP's loss terms for one batch: the model's outputs through the criterion with the released weights."""
    return PHPCriterion(losses, php_loss_weights(0.5))(model(batch), batch)


def make_batch(seed=1, batch=4):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB - 3, (batch, 10), generator=gen)
    ids[:, 7] = VOCAB - 1
    ids[:, 8:] = 0
    return {"images": torch.randn(batch, 3, 32, 16, generator=gen), "caption_ids": ids,
            "pids": torch.tensor([0, 3, 0, 4, 1, 2])[:batch]}


def test_features_losses_and_weights():
    model = make_php().eval()
    batch = make_batch()
    with torch.no_grad():
        outputs = model(batch)
        out = php_step(model, batch)
        image_tokens = model.base_model.encode_image(batch["images"])
        text_tokens = model.base_model.encode_text(batch["caption_ids"])
        img_parts, img_aux = model.shared_transformer(model.safl(image_tokens[:, 1:]))
        txt_parts, txt_aux = model.shared_transformer(model.safl(text_tokens))
        img = image_tokens[:, 0] + img_parts.mean(1)
        txt = text_tokens[torch.arange(4), batch["caption_ids"].argmax(1)] + txt_parts.mean(1)
        torch.testing.assert_close(model.encode_image(batch["images"]), img)
        torch.testing.assert_close(model.encode_text(batch["caption_ids"]), txt)
        torch.testing.assert_close(out["itc_loss"], 5 * objectives.compute_itc(img, txt, 50.0))
        torch.testing.assert_close(out["sdm_loss"], objectives.compute_sdm(img, txt, batch["pids"], 50.0))
        torch.testing.assert_close(out["aux_loss"], 0.5 * (img_aux + txt_aux))
        torch.testing.assert_close(outputs["image_aux"], img_aux)
        torch.testing.assert_close(outputs["text_aux"], txt_aux)
        logits_i, logits_t = model.classifier(img), model.classifier(txt)
        torch.testing.assert_close(out["id_loss"], objectives.compute_id(logits_i, logits_t, batch["pids"]))
    assert php_loss_weights(0.5, id_weight=2.0, mlm_weight=3.0) == {
        "itc": 5.0, "sdm": 1.0, "cmpm": 1.0, "id": 2.0, "mlm": 1.5, "aux": 0.5}


def test_training_step_with_mlm_reaches_every_module():
    model = make_php(("sdm", "mlm", "aux"), cmt_depth=1).train()
    batch = make_batch()
    batch["mlm_ids"] = batch["caption_ids"].clone()
    batch["mlm_labels"] = torch.zeros_like(batch["caption_ids"])
    batch["mlm_labels"][:, 2] = batch["caption_ids"][:, 2]
    batch["mlm_ids"][:, 2] = VOCAB - 3
    out = php_step(model, batch, ("sdm", "mlm", "aux"))
    assert set(out) == {"temperature", "sdm_loss", "mlm_loss", "mlm_acc", "aux_loss"}
    sum(v for k, v in out.items() if k.endswith("_loss")).backward()
    for name in ("safl.part_tokens", "safl.feed.4.weight", "shared_transformer.resblocks.1.attn.in_proj_weight",
                 "shared_transformer.resblocks.0.comb_param", "shared_transformer.resblocks.0.feed_forward.alpha",
                 "shared_transformer.resblocks.0.feed_forward.task_gate.weight", "mlm_head.fc.weight",
                 "base_model.visual.conv1.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    # 4 samples x 3 parts x 2 modalities, top-2: 48 picks per layer; the report resets the counters.
    loads = model.shared_transformer.expert_load()
    assert [int(c.sum()) for c in loads] == [48, 48]
    report = model.training_report()
    assert report.startswith("EFP expert load") and "layer 1:" in report and "24 tokens per layer" in report
    assert all(int(c.sum()) == 0 for c in model.shared_transformer.expert_load())
    assert "no training steps" in model.training_report()


def test_format_expert_load():
    text = format_expert_load([torch.tensor([3, 1]), torch.tensor([0, 4])], topk=1)
    assert text.endswith("layer 0: 0.750 0.250 | layer 1: 0.000 1.000") and "4 tokens per layer" in text


@pytest.mark.parametrize("encode", ["image", "text"])
def test_tokens_mode_features_do_not_depend_on_the_batch(encode):
    model = make_php(efp_attention="tokens").eval()
    batch = make_batch(batch=5)
    inputs = batch["images"] if encode == "image" else batch["caption_ids"]
    fn = model.encode_image if encode == "image" else model.encode_text
    with torch.no_grad():
        whole = fn(inputs)
        alone = torch.cat([fn(inputs[i:i + 1]) for i in range(5)])
        reordered = fn(inputs.flip(0)).flip(0)
    torch.testing.assert_close(whole, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole, reordered, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("encode", ["image", "text"])
def test_batch_mode_features_depend_on_the_batch(encode, caplog):
    with caplog.at_level(logging.WARNING, logger="model.php"):
        model = make_php(efp_attention="batch").eval()
    assert "across the samples of a batch" in caplog.text
    batch = make_batch(batch=5)
    inputs = batch["images"] if encode == "image" else batch["caption_ids"]
    fn = model.encode_image if encode == "image" else model.encode_text
    with torch.no_grad():
        whole = fn(inputs)
        first_three = fn(inputs[:3])
        alone = fn(inputs[:1])
    assert (whole[:3] - first_three).abs().max() > 1e-3
    assert (whole[:1] - alone).abs().max() > 1e-3


# ------------------------------------------------------------------ checkpoints
RELEASED_BLOCK_SHAPES = {  # per EFP block, D = 16, E = 3 experts, D / reduction = 4 (released names)
    "attn.in_proj_weight": (48, 16), "attn.in_proj_bias": (48,), "attn.out_proj.weight": (16, 16),
    "attn.out_proj.bias": (16,), "ln_1.weight": (16,), "ln_1.bias": (16,), "ln_2.weight": (16,),
    "ln_2.bias": (16,), "ln_3.weight": (16,), "ln_3.bias": (16,), "mlp.c_fc.weight": (64, 16),
    "mlp.c_fc.bias": (64,), "mlp.c_proj.weight": (16, 64), "mlp.c_proj.bias": (16,), "comb_param": (16,),
    "feed_forward.alpha": (), "feed_forward.input_gate.weight": (3, 16), "feed_forward.task_gate.weight": (3, 16),
}
RELEASED_EXPERT_SHAPES = {"norm.weight": (16,), "norm.bias": (16,), "down.weight": (4, 16), "down.bias": (4,),
                          "up.weight": (16, 4), "up.bias": (16,)}
RELEASED_SAFL_SHAPES = {"safl.part_tokens": (3, 16), "safl.pos_embeding": (162, 16), "safl.feed.0.weight": (16,),
                        "safl.feed.0.bias": (16,), "safl.feed.1.weight": (64, 16), "safl.feed.1.bias": (64,),
                        "safl.feed.4.weight": (16, 64), "safl.feed.4.bias": (16,)}


def released_state_dict(layers=2, experts=3, seed=5):
    """A state dict in the layout of PHP's released checkpoints (fp16, as the released code saves them)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = dict(RELEASED_SAFL_SHAPES)
    for i in range(layers):
        for key, shape in RELEASED_BLOCK_SHAPES.items():
            shapes[f"shared_transformer.resblocks.{i}.{key}"] = shape
        for j in range(experts):
            for key, shape in RELEASED_EXPERT_SHAPES.items():
                shapes[f"shared_transformer.resblocks.{i}.feed_forward.experts.{j}.{key}"] = shape
    state = {k: torch.randn(shape, generator=gen).half() for k, shape in shapes.items()}
    torch.manual_seed(seed)
    state.update({f"base_model.{k}": v.half() for k, v in CLIP(CFG, (32, 16), 8).state_dict().items()})
    return state


def test_released_layout_loads_strictly():
    model = make_php(("sdm", "itc", "aux"))
    state = released_state_dict()
    own = set(model.state_dict())
    assert own == set(state) - {"safl.pos_embeding"}
    with pytest.raises(UserError, match="unexpected key.*safl.pos_embeding"):
        load_model_state(model, state, "released.pth")
    ignored = PHP_METHOD.ignored_checkpoint_keys
    load_model_state(model, state, "released.pth", ignore_unexpected=ignored)
    loaded = model.state_dict()
    for key in ("safl.part_tokens", "shared_transformer.resblocks.1.feed_forward.alpha",
                "shared_transformer.resblocks.0.feed_forward.experts.2.up.weight"):
        torch.testing.assert_close(loaded[key], state[key].float())
    broken = dict(state)
    del broken["shared_transformer.resblocks.1.comb_param"]
    with pytest.raises(UserError, match="missing key.*resblocks.1.comb_param"):
        load_model_state(model, broken, "released.pth", ignore_unexpected=ignored)
    assert PHP_METHOD.recognise_checkpoint(state) and not PHP_METHOD.recognise_checkpoint(
        {k: v for k, v in state.items() if k.startswith("base_model.")})


def test_save_load_round_trip(tmp_path):
    model = make_php(seed=0).train()
    model(make_batch())  # count some routing: counters are not saved
    path = Checkpointer(model, save_dir=str(tmp_path)).save("best")
    assert not any("expert_counts" in k for k in torch.load(path, weights_only=True)["model"])
    other = make_php(seed=7)
    Checkpointer(other).load(path)
    batch = make_batch()
    model.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(batch["images"]), other.encode_image(batch["images"]))
        assert torch.equal(model.encode_text(batch["caption_ids"]), other.encode_text(batch["caption_ids"]))


# ------------------------------------------------------------------ precision, build, solver, errors
def args_namespace(**overrides):
    base = dict(model="php", pretrain_choice="tiny", from_scratch=True, img_size=(32, 16), stride_size=8,
                loss_names="sdm+itc+aux", temperature=0.02, cmt_depth=1, vocab_size=VOCAB, id_loss_weight=1.0,
                mlm_loss_weight=1.0, precision="fp32", device="cpu", cnum=3, num_experts=3, topk=2, reduction=4,
                moe_layers=2, moe_heads=2, aux_factor=0.25, efp_attention="tokens", lr=1e-5, lr_factor=5.0,
                bias_lr_factor=2.0, moe_lr_factor=3.0, transformer_lr_factor=1.5, weight_decay=4e-5,
                weight_decay_bias=0.0, optimizer="Adam", momentum=0.9, alpha=0.9, beta=0.999)
    base.update(overrides)
    return SimpleNamespace(**base)


def test_build_model_dispatch():
    args = args_namespace()
    model = build_model(args, num_classes=5)
    criterion = build_criterion(args)
    assert type(model) is PHP and type(criterion) is PHPCriterion
    assert criterion.aux_weight == 0.25 and criterion.weights["itc"] == 5.0
    assert model.safl.num_parts == 3 and len(model.shared_transformer.resblocks) == 2
    old = args_namespace(loss_names="sdm")
    del old.model  # IRRA's own configs have no `model`
    assert type(build_model(old, num_classes=5)) is IRRA
    with pytest.raises(UserError, match="--model 'foo'"):
        build_model(args_namespace(model="foo"))


@pytest.mark.parametrize("precision", ["fp16", "amp"])
def test_reduced_precision_runs(precision):
    from model import convert_weights_to_fp16

    model = build_model(args_namespace(), num_classes=5).train()
    if precision == "fp16":
        convert_weights_to_fp16(model)
    params = dict(model.named_parameters())
    if precision == "fp16":
        assert params["safl.feed.1.weight"].dtype == torch.float16
        assert params["shared_transformer.resblocks.0.feed_forward.experts.0.down.weight"].dtype == torch.float16
        assert params["safl.part_tokens"].dtype == params["shared_transformer.resblocks.0.comb_param"].dtype \
            == torch.float32
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "amp" else torch.autocast("cpu", enabled=False)
    with context:
        out = php_step(model, make_batch(), ("sdm", "itc", "aux"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())
    sum(v for k, v in out.items() if k.endswith("_loss")).backward()
    assert params["shared_transformer.resblocks.0.feed_forward.input_gate.weight"].grad is not None


def test_lr_rules():
    from solver.build import build_optimizer

    from model import get_method

    model = build_model(args_namespace(loss_names="sdm+aux+id"), num_classes=5)
    rules = get_method("php").lr_rules
    optimizer = build_optimizer(args_namespace(), model, rules(args_namespace()))
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
    block = "shared_transformer.resblocks.0."
    expected = {
        block + "attn.in_proj_weight": 1.5e-5, block + "comb_param": 1.5e-5, block + "feed_forward.alpha": 1.5e-5,
        block + "feed_forward.experts.1.down.weight": 3e-5, block + "feed_forward.input_gate.weight": 3e-5,
        block + "feed_forward.task_gate.weight": 3e-5, block + "feed_forward.experts.1.down.bias": 2e-5,
        block + "mlp.c_fc.bias": 2e-5, "safl.part_tokens": 1e-5, "safl.feed.1.bias": 2e-5,
        "classifier.weight": 5e-5, "base_model.visual.conv1.weight": 1e-5,
    }
    for name, lr in expected.items():
        assert rates[name] == pytest.approx(lr), name
    # Both factors at 1 (the recipes): exactly the released solver's rates, which ignore the two flags.
    plain_args = args_namespace(moe_lr_factor=1.0, transformer_lr_factor=1.0)
    plain = {g["name"]: g["lr"] for g in build_optimizer(plain_args, model, rules(plain_args)).param_groups}
    assert all(lr == pytest.approx(2e-5 if "bias" in n else 5e-5 if "classifier" in n else 1e-5)
               for n, lr in plain.items())


@pytest.mark.parametrize("kwargs, message", [
    (dict(topk=4), "--topk 4 exceeds --num_experts 3"),
    (dict(moe_heads=3), "width 16 is not divisible by --moe_heads 3"),
    (dict(reduction=32), "--reduction 32 leaves no expert bottleneck"),
    (dict(num_parts=0), "must be positive"),
    (dict(efp_attention="sample"), "--efp_attention 'sample'"),
])
def test_bad_php_options(kwargs, message):
    with pytest.raises(UserError, match=message):
        make_php(("sdm", "aux"), **kwargs)


@pytest.mark.parametrize("losses, message", [
    (("aux",), "PHP needs at least one of"),
    (("sdm", "foo"), "unknown: \\['foo'\\]"),
])
def test_bad_php_losses(losses, message):
    with pytest.raises(UserError, match=message):
        PHPCriterion(losses)


def test_php_command_line():
    from utils.options import get_args

    args = get_args(["--model", "php", "--loss_names", "sdm+itc+aux", "--num_experts", "4", "--topk", "2",
                     "--reduction", "8", "--moe_layers", "4", "--moe_heads", "8", "--transformer_lr_factor", "1.0",
                     "--moe_lr_factor", "2.0", "--aux_factor", "0.5", "--lr", "3e-6", "--cnum", "9"])
    assert (args.model, args.cnum, args.num_experts, args.topk, args.efp_attention) == ("php", 9, 4, 2, "tokens")
    assert get_args(["--loss_names", "sdm"]).model == "irra"
    with pytest.raises(UserError, match="--topk 5 exceeds --num_experts 4"):
        get_args(["--model", "php", "--loss_names", "sdm+aux", "--topk", "5"])
    with pytest.raises(UserError, match="aux alone|trains nothing"):
        get_args(["--model", "php", "--loss_names", "aux"])
    with pytest.raises(UserError, match="unknown loss aux"):
        get_args(["--loss_names", "sdm+aux"])  # irra has no aux
    with pytest.raises(UserError, match="--aux_factor"):
        get_args(["--model", "php", "--loss_names", "sdm+aux", "--aux_factor", "-1"])
    with pytest.raises(UserError, match="--efp_attention: invalid choice: 'sample'"):
        get_args(["--model", "php", "--efp_attention", "sample"])


@pytest.mark.parametrize("dataset", ["cuhk-pedes", "icfg-pedes", "rstpreid"])
def test_recipes(dataset):
    from utils.options import get_args

    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", f"php_{dataset}.yaml")
    args = get_args(["--config_file", recipe])
    assert args.model == "php" and args.loss_names == "sdm+itc+aux" and args.lr == pytest.approx(3e-6)
    assert (args.cnum, args.num_experts, args.topk, args.reduction, args.moe_layers, args.moe_heads) == (9, 4, 2, 8, 4, 8)
    assert args.moe_lr_factor == args.transformer_lr_factor == 1.0 and args.efp_attention == "tokens"
    assert args.batch_size == 64 and args.num_epoch == 60 and args.img_aug and args.dataset_name.lower() == dataset
