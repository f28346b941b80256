"""Tiny Bi-IRRA configurations and batches shared by the Bi-IRRA tests (seconds on a CPU)."""

from dataclasses import replace

import torch

from model import biirra_net as B

VOCAB = 40
PAD, BOS, EOS, MASK = 1, 0, 2, VOCAB - 1


def tiny_config(width: int = 32, fusion_layers: int = 2, img: int = 32, patch: int = 8) -> B.BiIrraConfig:
    base = B.ARCHITECTURES["tiny"]
    return replace(
        base,
        vision=replace(base.vision, img_size=(img, img), patch_size=patch, width=width, layers=2, heads=2),
        text=replace(base.text, vocab_size=VOCAB, width=width, layers=2, heads=2, intermediate=2 * width,
                     max_positions=24),
        fusion=replace(base.fusion, layers=fusion_layers, heads=2, intermediate=2 * width),
        embed_dim=16,
    )


def tiny_model(seed: int = 0, **kwargs) -> B.BiIRRA:
    torch.manual_seed(seed)
    return B.BiIRRA(tiny_config(**kwargs), languages=("en", "ch"))


def captions(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, length] rows ``<s> ids… </s> <pad>…`` with 3..length-2 content tokens."""
    ids = torch.full((batch, length), PAD, dtype=torch.long)
    for row in range(batch):
        n = int(torch.randint(3, length - 1, (1,), generator=generator))
        ids[row, 0] = BOS
        ids[row, 1:n] = torch.randint(3, MASK, (n - 1,), generator=generator)
        ids[row, n] = EOS
    return ids


def tiny_batch(config: B.BiIrraConfig, pids=(0, 0, 1, 2), length: int = 10, seed: int = 0,
               languages=("en", "ch")) -> dict:
    """A training batch with every key of :func:`model.biirra_net.batch_keys`."""
    g = torch.Generator().manual_seed(seed)
    n, size = len(pids), config.vision.img_size
    batch = {
        B.IMAGES: torch.randn(n, 3, *size, generator=g),
        B.IMAGE_MASK: torch.rand(n, config.vision.num_patches, generator=g) < 0.5,
        B.PIDS: torch.tensor(pids),
    }
    for language in languages:
        ids = captions(n, length, g)
        real = ids != PAD
        chosen = (torch.rand(ids.shape, generator=g) < 0.4) & real & (ids != BOS) & (ids != EOS)
        chosen[:, 1] = True  # at least one masked token per caption
        batch[B.keyed(B.CAPTION_IDS, language)] = ids
        batch[B.keyed(B.ATTENTION_MASK, language)] = real.long()
        batch[B.keyed(B.MLM_IDS, language)] = ids.masked_fill(chosen, MASK)
        batch[B.keyed(B.MLM_LABELS, language)] = ids.masked_fill(~chosen, PAD)
    return batch
