"""SAM 2 host: stock sam2 models (random hiera_t weights) against sam2's own image predictor."""

from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sam2", reason="SAM 2 is optional: SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0")

from samed_adapter.hosts import sam2 as host  # noqa: E402
from samed_adapter.hosts.sam import Sam2Host  # noqa: E402
from samed_adapter.hosts.random_weights import randomize_weights  # noqa: E402

def image_embeddings(model, images, mask_decoder=None):
    """The whole image path, as SAM2ImagePredictor.set_image runs it: features, then the
    decoder's projections of the high-resolution levels."""
    embeddings, high_res = host.image_features(model, images)
    return embeddings, host.project_high_res(mask_decoder or model.sam_mask_decoder, high_res)


# SAM2Transforms scripts its resize with torch.jit.script, which newer torch deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def model():
    return host.build_sam2("sam2.1_hiera_t", seed=0)


def _images(batch: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(batch)]


@pytest.fixture(scope="module")
def at_1024(model):
    """sam2's image predictor and ours on the same 1024 image (about 10 s on two cores)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(model)
    image = _images(1, 1024)[0]
    predictor.set_image(image)
    x = predictor._transforms(image)[None]  # ToTensor (/255), resize to 1024, ImageNet mean/std
    with torch.no_grad():
        ours = image_embeddings(model, x)
    return predictor, ours


def _decoder_like_stock(model, num_classes: int = 3):
    """A K+1-token decoder holding the stock values of every tensor that is not class-sized
    (for K = 3: the whole stock state dict, which then loads strictly)."""
    stock = model.sam_mask_decoder
    decoder = host.build_mask_decoder(stock, num_classes).eval()
    if num_classes == stock.num_multimask_outputs:
        decoder.load_state_dict(stock.state_dict())
        return decoder
    shared = {k: v for k, v in stock.state_dict().items() if not host.is_class_sized(k, decoder)}
    missing, unexpected = decoder.load_state_dict(shared, strict=False)
    assert not unexpected and all(host.is_class_sized(k, decoder) for k in missing)
    return decoder


# ---------------------------------------------------------------- building and naming


def test_configs_are_the_shipped_ones_and_the_trunk_table_matches_them():
    from hydra import compose
    from sam2.modeling.backbones.hieradet import Hiera

    defaults = inspect.signature(Hiera).parameters
    assert len(host.SAM2_CONFIGS) == 8
    for name, config in host.SAM2_CONFIGS.items():
        cfg = compose(config_name=config).model
        trunk = cfg.image_encoder.trunk
        shape = tuple(
            tuple(trunk[k]) if k == "stages" and k in trunk else trunk.get(k, defaults[k].default)
            for k in ("embed_dim", "num_heads", "stages")
        )
        size = name.split("_hiera_")[1]
        assert shape == host._TRUNKS[f"hiera_{size}"], name
        # The version is told by no_obj_embed_spatial (2.1 only).
        assert bool(cfg.get("no_obj_embed_spatial", False)) == name.startswith("sam2.1"), name
    with pytest.raises(ValueError, match="unknown SAM 2 backbone"):
        host.sam2_config("sam2.1_hiera_xl")


def test_random_build_is_eval_deterministic_and_touches_every_tensor(model):
    assert host.is_sam2(model) and not model.training
    state = model.state_dict()
    # Stock initialises these at zero; random weights must exercise them.
    for name in ("image_encoder.trunk.pos_embed", "image_encoder.trunk.pos_embed_window", "no_mem_embed"):
        assert state[name].abs().min() > 0
    assert all(t.std() > 0 for t in state.values() if t.is_floating_point() and t.numel() > 1)
    # The draw depends on the seed only (checked on a small part: a full build takes seconds).
    first, second = (host.build_mask_decoder(model.sam_mask_decoder, 2) for _ in range(2))
    randomize_weights(first, 0)
    randomize_weights(second, 0)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not host.is_sam2(torch.nn.Linear(2, 2))


def test_infer_backbone_round_trips(model):
    assert host.infer_sam2_backbone(model) == "sam2.1_hiera_t"
    assert host.sam2_backbone_for_state_dict(model.state_dict()) == "sam2.1_hiera_t"
    for name in ("sam2_hiera_t", "sam2.1_hiera_s", "sam2_hiera_s"):
        built = host.build_sam2(name)
        assert host.infer_sam2_backbone(built) == name
        assert host.sam2_backbone_for_state_dict(built.state_dict()) == name
    with pytest.raises(ValueError, match="not a SAM 2 state dict"):
        host.sam2_backbone_for_state_dict({"image_encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 1)})


def test_checkpoint_is_loaded_by_sam2_and_a_wrong_one_is_named(model, tmp_path):
    path = tmp_path / "sam2.1_hiera_t.pt"
    torch.save({"model": model.state_dict()}, path)
    loaded = host.build_sam2("sam2.1_hiera_t", path).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    wrong = r"not a stock sam2_hiera_t SAM 2 checkpoint: its tensors are those of sam2.1_hiera_t"
    with pytest.raises(ValueError, match=wrong):
        host.build_sam2("sam2_hiera_t", path)
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="under 'model'"):
        host.build_sam2("sam2.1_hiera_t", tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        host.build_sam2("sam2.1_hiera_t", tmp_path / "missing.pt")


def test_build_survives_cleared_or_foreign_hydra_state(tmp_path):
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    sam2_hydra = GlobalHydra.instance().hydra
    try:
        GlobalHydra.instance().clear()
        assert host.is_sam2(host.build_sam2("sam2_hiera_t"))  # set up again, as importing sam2 does
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(tmp_path), version_base="1.2"):  # someone's own app
            theirs = GlobalHydra.instance().hydra
            assert host.is_sam2(host.build_sam2("sam2_hiera_t"))
            assert GlobalHydra.instance().hydra is theirs
    finally:
        GlobalHydra.instance().hydra = sam2_hydra


def test_module_imports_without_sam2():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'sam2': raise ImportError('no sam2 here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, samed_adapter.hosts.sam2 as h\n"
        "assert not h.is_sam2(torch.nn.Linear(1, 1)) and 'sam2' not in sys.modules\n"
        "assert h.sam2_config('sam2.1_hiera_l') == 'configs/sam2.1/sam2.1_hiera_l.yaml'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- encoder


def test_trunk_qkv_layers_and_their_state_names(model):
    blocks = Sam2Host(model).blocks()
    assert len(blocks) == 12
    state = model.state_dict(keep_vars=True)
    boundaries = []
    for i, block in enumerate(blocks):
        layer = block.attn.qkv
        assert isinstance(layer, torch.nn.Linear) and layer.bias is not None
        assert (layer.in_features, layer.out_features) == (blocks[i].dim, 3 * blocks[i].dim_out)
        assert Sam2Host(model).qkv_dims(i) == (blocks[i].dim, blocks[i].dim_out)
        assert state[Sam2Host.lora_prefix.format(i=i) + ".weight"] is layer.weight
        if blocks[i].dim != blocks[i].dim_out:
            boundaries.append(i)
    assert boundaries == [1, 3, 10]  # hiera_t stages (1, 2, 7, 2): dim 96 -> 192 -> 384 -> 768


def test_image_embeddings_at_1024_equal_the_image_predictor(at_1024):
    predictor, (embeddings, high_res) = at_1024
    assert embeddings.shape == (1, 256, 64, 64)
    assert [tuple(f.shape) for f in high_res] == [(1, 32, 256, 256), (1, 64, 128, 128)]
    torch.testing.assert_close(embeddings, predictor._features["image_embed"], rtol=0, atol=0)
    for ours, theirs in zip(high_res, predictor._features["high_res_feats"]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_image_embeddings_at_512_equal_sam2s_own_path_at_512(model):
    """sam2's predictor runs at 512 once told the size (it hard-codes 1024 feature sizes)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    parts = Sam2Host(model).stock_parts()
    try:
        host.set_image_size(model, 512)
        predictor = SAM2ImagePredictor(model)  # resizes inputs to model.image_size
        predictor._bb_feat_sizes = [(128, 128), (64, 64), (32, 32)]
        images = _images(2, 512, seed=1)
        predictor.set_image_batch(images)
        x = predictor._transforms.forward_batch(images)
    finally:
        Sam2Host(model).restore_parts(parts)
    with torch.no_grad():
        embeddings, high_res = image_embeddings(model, x)
    assert embeddings.shape == (2, 256, 32, 32)
    assert [tuple(f.shape) for f in high_res] == [(2, 32, 128, 128), (2, 64, 64, 64)]
    torch.testing.assert_close(embeddings, predictor._features["image_embed"], rtol=0, atol=0)
    for ours, theirs in zip(high_res, predictor._features["high_res_feats"]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # The background position embedding is interpolated to the 128 x 128 stage-1 grid on the fly.
    assert model.image_encoder.trunk._get_pos_embed((128, 128)).shape == (1, 128, 128, 96)


def test_image_size_must_be_a_multiple_of_32(model):
    host.check_image_size(model, 512)
    host.check_image_size(model, 1024)
    with pytest.raises(ValueError, match="multiple of 32"):
        host.check_image_size(model, 528)
    # Why: at 528 the 8 x 8 window embedding does not tile the 132 x 132 grid inside sam2.
    with pytest.raises(RuntimeError):
        model.image_encoder.trunk(torch.zeros(1, 3, 528, 528))


def test_a_decoders_own_high_res_projection_is_used(model):
    decoder = _decoder_like_stock(model, 8)
    with torch.no_grad():
        decoder.conv_s0.weight.mul_(2)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        embeddings, raw = host.image_features(model, x)
        stock = host.project_high_res(model.sam_mask_decoder, raw)
        ours_embeddings, ours = image_embeddings(model, x, mask_decoder=decoder)
    assert [tuple(f.shape) for f in raw] == [(1, 256, 32, 32), (1, 256, 16, 16)]
    torch.testing.assert_close(ours_embeddings, embeddings, rtol=0, atol=0)
    torch.testing.assert_close(ours[1], stock[1], rtol=0, atol=0)
    torch.testing.assert_close(ours[0], 2 * stock[0] - model.sam_mask_decoder.conv_s0.bias[:, None, None])


# ---------------------------------------------------------------- prompt encoder and decoder


def test_k3_decoder_with_stock_values_equals_the_predictors_multimask_output(model, at_1024):
    predictor, (embeddings, high_res) = at_1024
    _, iou, low_res = predictor.predict(multimask_output=True, return_logits=True)  # no prompts
    decoder = _decoder_like_stock(model, 3)
    prompt = host.build_prompt_encoder(model.sam_prompt_encoder, 1024)
    prompt.load_state_dict(model.sam_prompt_encoder.state_dict())
    with torch.no_grad():
        masks, ious = host.decode(prompt, decoder, embeddings, high_res)
    assert masks.shape == (1, 4, 256, 256) and ious.shape == (1, 4)
    torch.testing.assert_close(masks[0, 1:].clamp(-32, 32), torch.from_numpy(low_res), rtol=0, atol=0)
    torch.testing.assert_close(ious[0, 1:], torch.from_numpy(iou), rtol=0, atol=0)


def test_k3_decoder_with_stock_values_equals_stock_at_512(model):
    stock = model.sam_mask_decoder
    decoder = _decoder_like_stock(model, 3)
    assert {k: v.shape for k, v in decoder.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}
    for attr in ("use_high_res_features", "pred_obj_scores", "use_multimask_token_for_obj_ptr",
                 "dynamic_multimask_via_stability", "num_mask_tokens"):
        assert getattr(decoder, attr) == getattr(stock, attr), attr
    assert decoder.iou_prediction_head.sigmoid_output == stock.iou_prediction_head.sigmoid_output
    prompt = host.build_prompt_encoder(model.sam_prompt_encoder, 512)
    prompt.load_state_dict(model.sam_prompt_encoder.state_dict())
    assert prompt.image_embedding_size == (32, 32) and prompt.input_image_size == (512, 512)
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(2, 256, 32, 32, generator=g)
    high_res = [torch.randn(2, 32, 128, 128, generator=g), torch.randn(2, 64, 64, 64, generator=g)]
    with torch.no_grad():
        masks, ious = host.decode(prompt, decoder, embeddings, high_res)
        sparse, dense = prompt(points=None, boxes=None, masks=None)
        want_masks, want_ious, _, _ = stock(
            image_embeddings=embeddings, image_pe=prompt.get_dense_pe(),
            sparse_prompt_embeddings=sparse.expand(2, -1, -1), dense_prompt_embeddings=dense.expand(2, -1, -1, -1),
            multimask_output=True, repeat_image=False, high_res_features=high_res,
        )
    torch.testing.assert_close(masks[:, 1:], want_masks, rtol=0, atol=0)
    torch.testing.assert_close(ious[:, 1:], want_ious, rtol=0, atol=0)


def test_k8_decoder_returns_every_class_in_order_and_batches_like_single_images(model):
    decoder = host.build_mask_decoder(model.sam_mask_decoder, 8).eval()
    randomize_weights(decoder, 3)
    prompt = host.build_prompt_encoder(model.sam_prompt_encoder, 512)
    randomize_weights(prompt, 4)
    g = torch.Generator().manual_seed(1)
    embeddings = torch.randn(2, 256, 32, 32, generator=g)
    high_res = [torch.randn(2, 32, 128, 128, generator=g), torch.randn(2, 64, 64, 64, generator=g)]
    with torch.no_grad():
        masks, ious = host.decode(prompt, decoder, embeddings, high_res)
        assert masks.shape == (2, 9, 128, 128) and ious.shape == (2, 9)
        for b in range(2):
            alone = host.decode(prompt, decoder, embeddings[b : b + 1], [f[b : b + 1] for f in high_res])
            torch.testing.assert_close(masks[b : b + 1], alone[0])
            torch.testing.assert_close(ious[b : b + 1], alone[1])
        # Channel k is mask token k: silencing hypernetwork 5 and iou row 5 touches channel 5 only.
        decoder.output_hypernetworks_mlps[5].layers[-1].weight.zero_()
        decoder.output_hypernetworks_mlps[5].layers[-1].bias.zero_()
        decoder.iou_prediction_head.layers[-1].weight[5].zero_()
        decoder.iou_prediction_head.layers[-1].bias[5].zero_()
        silenced, silenced_ious = host.decode(prompt, decoder, embeddings, high_res)
    assert silenced[:, 5].abs().max() == 0 and torch.all(silenced_ious[:, 5] == 0.5)  # sigmoid(0)
    keep = [k for k in range(9) if k != 5]
    torch.testing.assert_close(silenced[:, keep], masks[:, keep], rtol=0, atol=0)
    assert masks[:, 5].abs().max() > 0


def test_decode_refuses_embeddings_of_another_size(model):
    decoder = _decoder_like_stock(model, 2)
    prompt = host.build_prompt_encoder(model.sam_prompt_encoder, 512)
    with pytest.raises(ValueError, match="build it for this image size"):
        high_res = [torch.zeros(1, 32, 256, 256), torch.zeros(1, 64, 128, 128)]
        host.decode(prompt, decoder, torch.zeros(1, 256, 64, 64), high_res)


def test_class_sized_decoder_tensors_are_exactly_those_whose_shape_depends_on_k(model):
    stock = model.sam_mask_decoder.state_dict()
    decoder = host.build_mask_decoder(model.sam_mask_decoder, 8)
    sized = {k for k in decoder.state_dict() if host.is_class_sized(k, decoder)}
    differ = {k for k, v in decoder.state_dict().items() if k not in stock or stock[k].shape != v.shape}
    # Every tensor whose shape depends on K is class-sized; so are the hypernetworks of tokens
    # 0..3, which keep stock shapes but belong to the K+1 tokens (fresh, as for SAM).
    assert differ <= sized
    assert {k.split(".")[1] for k in sized - differ} == {"0", "1", "2", "3"}
    assert all(k.startswith("output_hypernetworks_mlps.") for k in sized - differ)
    assert {k.split(".")[0] for k in sized} == {"mask_tokens", "output_hypernetworks_mlps", "iou_prediction_head"}
    assert decoder.mask_tokens.weight.shape == (9, 256) and len(decoder.output_hypernetworks_mlps) == 9
    assert not any(host.is_class_sized(k, decoder) for k in ("obj_score_token.weight", "conv_s0.weight",
                                                               "pred_obj_score_head.layers.2.weight"))


# ---------------------------------------------------------------- what patching keeps


def test_stock_parts_restore_the_same_objects(model):
    sam2 = Sam2Host(model)
    parts = sam2.stock_parts()
    assert parts == {"image_size": 1024, "sam_image_embedding_size": 64}
    prompt, decoder = sam2.prompt_encoder, sam2.mask_decoder
    sam2.prompt_encoder = host.build_prompt_encoder(prompt, 512)
    sam2.mask_decoder = host.build_mask_decoder(decoder, 8)
    host.set_image_size(model, 512)
    assert (model.image_size, model.sam_image_embedding_size) == (512, 32)
    assert model.sam_mask_decoder.num_mask_tokens == 9
    sam2.restore_parts(parts)
    sam2.prompt_encoder, sam2.mask_decoder = prompt, decoder
    assert (model.image_size, model.sam_image_embedding_size) == (1024, 64)
    assert "sam_mask_decoder.mask_tokens.weight" in model.state_dict()
    assert model.state_dict()["sam_mask_decoder.mask_tokens.weight"].shape == (4, 256)
