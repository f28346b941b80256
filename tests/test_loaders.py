"""build_dataloader on a tiny synthetic benchmark, and the transforms."""
from types import SimpleNamespace

import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from datasets import CLIP_MEAN, CLIP_STD, build_dataloader, build_transforms
from datasets.synthetic import write_synthetic
from utils.errors import UserError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    for name in ("CUHK-PEDES", "ICFG-PEDES"):
        write_synthetic(folder, name, num_ids=14, images_per_id=2, image_size=(48, 16), num_test_ids=3,
                        num_val_ids=3, seed=0)
    return folder


def _args(root, **overrides):
    values = dict(
        dataset_name="CUHK-PEDES", root_dir=str(root), training=True, img_size=(24, 8), img_aug=False,
        text_length=77, batch_size=8, test_batch_size=5, num_workers=0, sampler="random", num_instance=2,
        val_dataset="test", MLM=True, loss_names="sdm+mlm+id", mlm_probability=0.15, masked_token_rate=0.8,
        masked_token_unchanged_rate=0.1, keep_caption_unmasked=False, seed=1, device="cpu",
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def test_training_loaders_shapes_and_dtypes(root):
    train, val_img, val_txt, num_classes = build_dataloader(_args(root))
    assert num_classes == 8  # 14 - 3 test - 3 val
    assert hasattr(train.sampler, "set_epoch") and train.batch_size == 8 and not train.pin_memory
    batches = list(train)
    assert sum(len(b["pids"]) for b in batches) == 8 * 2 * 2  # every caption once, last batch kept
    batch = batches[0]
    assert set(batch) == {"pids", "image_ids", "images", "caption_ids", "mlm_ids", "mlm_labels"}
    assert batch["pids"].dtype == torch.long and batch["image_ids"].dtype == torch.long
    assert batch["images"].dtype == torch.float32 and batch["images"].shape == (8, 3, 24, 8)
    for key in ("caption_ids", "mlm_ids", "mlm_labels"):
        assert batch[key].dtype == torch.long and batch[key].shape == (8, 77)
    assert torch.equal(batch["caption_ids"], batch["mlm_ids"])  # IRRA-faithful default
    assert (batch["pids"] < num_classes).all()

    pids, images = next(iter(val_img))
    assert val_img.batch_size == val_txt.batch_size == 8  # val uses --batch_size, as IRRA
    assert images.shape == (6, 3, 24, 8) and pids.dtype == torch.long  # 3 test ids x 2 images
    pids, captions = next(iter(val_txt))
    assert captions.shape == (8, 77) and captions.dtype == torch.long and (captions[:, 0] == 49406).all()
    assert sum(len(p) for p, _ in val_img) == 3 * 2 and sum(len(p) for p, _ in val_txt) == 3 * 2 * 2


def test_unmasked_captions_and_no_mlm(root):
    train, *_ = build_dataloader(_args(root, keep_caption_unmasked=True))
    batch = next(iter(train))
    assert not torch.equal(batch["caption_ids"], batch["mlm_ids"])
    assert not (batch["caption_ids"] == 49405).any()
    train, *_ = build_dataloader(_args(root, MLM=False, loss_names="sdm+id"))
    assert set(next(iter(train))) == {"pids", "image_ids", "images", "caption_ids"}


def test_test_mode_and_val_split(root):
    train, img_loader, txt_loader, num_classes = build_dataloader(_args(root, training=False))
    assert train is None  # the same four fields in testing as in training
    assert num_classes == 8 and img_loader.batch_size == 5 and txt_loader.batch_size == 5
    assert [len(p) for p, _ in img_loader] == [5, 1]
    _, val_img, _, _ = build_dataloader(_args(root, val_dataset="val"))
    assert sorted({int(p) for p, _ in val_img for p in p}) == [9, 10, 11]  # CUHK val ids as in the file (train 1..8)


def test_identity_sampler_and_sharding(root):
    args = _args(root, sampler="identity", batch_size=8, num_instance=2, seed=3)
    train, *_ = build_dataloader(args, world_size=2, rank=1)
    assert train.batch_size == 4 and (train.sampler.sampler.num_replicas, train.sampler.sampler.rank) == (2, 1)
    rank0, *_ = build_dataloader(_args(root, sampler="identity", num_instance=2, seed=3), world_size=2, rank=0)
    single, *_ = build_dataloader(_args(root, sampler="identity", num_instance=2, seed=3))
    for loader in (train, rank0, single):
        loader.sampler.set_epoch(2)
    a, b, s = ([batch["image_ids"].tolist() for batch in loader] for loader in (rank0, train, single))
    assert len(a) == len(b) == len(s)
    assert [x + y for x, y in zip(a, b)] == s


def test_workers_and_pin_memory_settings(root):
    train, val_img, _, _ = build_dataloader(_args(root, num_workers=1), device="cuda:0")
    assert train.num_workers == 1 and train.persistent_workers and train.pin_memory and val_img.pin_memory


@pytest.mark.parametrize(
    "overrides, layout, message",
    [({"batch_size": 9}, {"world_size": 2}, "multiple of the world size 2"),
     ({}, {"world_size": 2, "rank": 2}, "rank 2 is outside world size 2"),
     ({"sampler": "identity", "num_instance": 3}, {}, "multiple of --num_instance 3"),
     ({"dataset_name": "ICFG-PEDES", "val_dataset": "val"}, {}, "ICFG-PEDES defines no validation split"),
     ({"masked_token_rate": 0.95, "masked_token_unchanged_rate": 0.1}, {}, "exceeds 1"),
     ({"dataset_name": "RSTPReid"}, {}, "must contain a 'RSTPReid' folder")],
)
def test_bad_arguments(root, overrides, layout, message):
    """What build_dataloader itself meets; values the command line checks are tested in test_options.py."""
    with pytest.raises(UserError, match=message):
        build_dataloader(_args(root, **overrides), **layout)


# --- transforms -------------------------------------------------------------------------------


def test_test_transform_values_by_hand():
    transform = build_transforms((6, 4), is_train=False)
    out = transform(Image.new("RGB", (10, 20), (255, 0, 51)))
    assert out.shape == (3, 6, 4)
    expected = [(1.0 - CLIP_MEAN[0]) / CLIP_STD[0], (0.0 - CLIP_MEAN[1]) / CLIP_STD[1], (0.2 - CLIP_MEAN[2]) / CLIP_STD[2]]
    for channel, value in enumerate(expected):
        assert torch.allclose(out[channel], torch.full((6, 4), value), atol=1e-5)


def test_train_transform_pipelines():
    plain = [type(t) for t in build_transforms((12, 4), aug=False, is_train=True).transforms]
    assert plain == [T.Resize, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    augmented = build_transforms((12, 4), aug=True, is_train=True)
    assert [type(t) for t in augmented.transforms] == [
        T.Resize, T.RandomHorizontalFlip, T.Pad, T.RandomCrop, T.ToTensor, T.Normalize, T.RandomErasing]
    assert augmented.transforms[2].padding == 10 and augmented.transforms[6].scale == (0.02, 0.4)
    assert augmented(Image.new("RGB", (7, 9))).shape == (3, 12, 4)
    # a left/right two-colour image is mirrored half of the time
    img = Image.new("RGB", (2, 1), (255, 255, 255))
    img.putpixel((0, 0), (0, 0, 0))
    torch.manual_seed(0)
    flips = [build_transforms((1, 2), is_train=True)(img)[0, 0, 0] > 0 for _ in range(200)]
    assert 60 < sum(bool(f) for f in flips) < 140


def test_bad_image_size():
    with pytest.raises(UserError, match="--img_size must be two positive integers"):
        build_transforms((384,))
    with pytest.raises(UserError, match="--img_size"):
        build_transforms((0, 128))
