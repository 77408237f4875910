"""VQTokenizer: shapes, round trips, errors, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from mars_tokenizer import VQGAN, VQGANConfig, VQTokenizer
from mars_tokenizer.vqgan import VectorQuantizer


def build_tiny_tokenizer(**overrides) -> VQTokenizer:
    torch.manual_seed(0)
    return VQTokenizer(VQGANConfig.from_preset("tiny", **overrides)).eval()


def images(b: int = 2, h: int = 16, w: int = 16) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("name, factor, size", [("tiny", 4, 32), ("shapes", 16, 8192 // 16), ("paper", 16, 8192)])
def test_presets_downsample_and_codebook(name, factor, size):
    config = VQGANConfig.from_preset(name)
    assert config.downsample == factor
    assert config.codebook_size == size


def test_unknown_preset_and_bad_groups_are_rejected():
    with pytest.raises(ValueError, match="unknown preset"):
        VQGANConfig.from_preset("huge")
    with pytest.raises(ValueError, match="norm_groups"):
        VQGANConfig.from_preset("tiny", norm_groups=3)


@pytest.mark.parametrize("h, w", [(16, 16), (8, 24), (32, 12)])
def test_encode_decode_shapes_for_any_multiple_of_the_factor(h, w):
    tokenizer = build_tiny_tokenizer()
    codes = tokenizer.encode(images(3, h, w))
    assert codes.dtype == torch.long and codes.shape == (3, h // 4, w // 4)
    assert tokenizer.code_shape(h, w) == (h // 4, w // 4)
    assert 0 <= codes.min() and codes.max() < tokenizer.codebook_size
    decoded = tokenizer.decode(codes)
    assert decoded.shape == (3, 3, h, w) and decoded.dtype == torch.float32
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_patches_fold_into_channels_and_multiply_the_factor():
    tokenizer = build_tiny_tokenizer(patch_size=2)
    assert tokenizer.downsample == 8
    codes = tokenizer.encode(images(2, 16, 40))
    assert codes.shape == (2, 2, 5)
    assert tokenizer.decode(codes).shape == (2, 3, 16, 40)
    with pytest.raises(ValueError, match="factor 8"):
        tokenizer.encode(images(1, 12, 16))


def test_decoder_norm_can_be_left_out():
    vqgan = build_tiny_tokenizer(decoder_norm=False).vqgan
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in vqgan.decoder.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in vqgan.encoder.modules())
    assert vqgan(images())["reconstruction"].shape == (2, 3, 16, 16)


def test_pixel_layers_sit_at_full_resolution_around_the_folding(tmp_path):
    tokenizer = build_tiny_tokenizer(patch_size=2, pixel_channels=4)
    encoder, decoder = tokenizer.vqgan.encoder, tokenizer.vqgan.decoder
    assert encoder.pixel_in.in_channels == 3 and encoder.conv_in.in_channels == 4 * 2 * 2
    assert decoder.conv_out.out_channels == 4 * 2 * 2 and decoder.last_layer is decoder.pixel_out
    plain = build_tiny_tokenizer().vqgan.decoder
    assert plain.last_layer is plain.conv_out
    codes = tokenizer.encode(images(2, 16, 24))
    assert codes.shape == (2, 2, 3) and tokenizer.decode(codes).shape == (2, 3, 16, 24)
    tokenizer.save_pretrained(tmp_path)
    loaded = VQTokenizer.from_pretrained(tmp_path)
    assert loaded.vqgan.config.pixel_channels == 4
    torch.testing.assert_close(loaded.decode(codes), tokenizer.decode(codes))
    with pytest.raises(ValueError, match="pixel_channels needs patch_size > 1"):
        VQGANConfig.from_preset("tiny", pixel_channels=4)


def test_decode_then_encode_is_a_fixed_point_of_codes():
    """Codes of a decoded image decode to the same image: decode is deterministic per code."""
    tokenizer = build_tiny_tokenizer()
    codes = torch.randint(0, tokenizer.codebook_size, (2, 4, 4))
    assert torch.equal(tokenizer.decode(codes), tokenizer.decode(codes.clone().to(torch.int16)))
    # a one-code change only changes the pixels near it (receptive field of the decoder)
    changed = codes.clone()
    changed[0, 0, 0] = (codes[0, 0, 0] + 1) % tokenizer.codebook_size
    diff = (tokenizer.decode(changed) - tokenizer.decode(codes)).abs().amax(dim=1)
    assert diff[1].max() == 0 and diff[0].max() > 0


FSQ = dict(quantizer="fsq", fsq_levels=(4, 4, 2), codebook_size=32, codebook_dim=3)


@pytest.mark.parametrize("quantizer", [{}, FSQ], ids=["vq", "fsq"])
def test_encode_matches_the_training_forward(quantizer):
    tokenizer = build_tiny_tokenizer(**quantizer)
    x = images()
    out = tokenizer.vqgan(x)
    assert torch.equal(tokenizer.encode(x), out["codes"])
    torch.testing.assert_close(tokenizer.decode(out["codes"]), out["reconstruction"].clamp(-1, 1))


def test_wrong_inputs_give_clear_errors():
    tokenizer = build_tiny_tokenizer()
    with pytest.raises(ValueError, match="multiple of the tokenizer's downsampling factor 4"):
        tokenizer.encode(images(1, 18, 16))
    with pytest.raises(TypeError, match="float tensor"):
        tokenizer.encode((images() * 127).to(torch.uint8))
    with pytest.raises(TypeError, match="float tensor"):
        tokenizer.encode(images().numpy())
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        tokenizer.encode(images()[0])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        tokenizer.encode((images() + 1) * 127.5)
    with pytest.raises(TypeError, match="integer tensor"):
        tokenizer.decode(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"shape \(B, h, w\)"):
        tokenizer.decode(torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        tokenizer.decode(torch.full((1, 4, 4), 32))


def test_save_and_load_round_trip(tmp_path):
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "config.json").read_text())["config"]["codebook_size"] == 32
    loaded = VQTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.config == tokenizer.config
    x = images()
    codes = tokenizer.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), tokenizer.decode(codes))


def test_loading_missing_or_foreign_files_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VQTokenizer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        VQTokenizer.from_pretrained(tmp_path / "half")
    build_tiny_tokenizer().save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a mars-vqgan config"):
        VQTokenizer.from_pretrained(tmp_path / "other")


def test_fsq_codes_cover_the_implicit_codebook_and_round_trip():
    quantize = build_tiny_tokenizer(**FSQ).vqgan.quantize
    codes = torch.arange(32).reshape(1, 4, 8)
    vectors = quantize.lookup(codes)
    assert vectors.shape == (1, 3, 4, 8) and vectors.min() == -1 and vectors.max() == 1
    assert torch.equal(quantize.codes(torch.atanh(vectors.clamp(-0.999, 0.999))), codes)
    with pytest.raises(ValueError, match="fsq_levels"):
        VQGANConfig.from_preset("tiny", quantizer="fsq", fsq_levels=(4, 4))


def test_dead_codes_are_restarted_onto_encoder_outputs():
    model = VQGAN(VQGANConfig.from_preset("tiny"))
    quantize = model.quantize
    quantize.usage[:] = 5.0
    quantize.usage[[3, 7]] = 0.0
    before = quantize.embedding.weight.detach().clone()
    latent = model.encode_latent(images())
    assert quantize.restart_dead_codes(latent, threshold=1.0) == 2
    after = quantize.embedding.weight.detach()
    assert torch.equal(after[[0, 1, 2]], before[[0, 1, 2]])
    assert not torch.equal(after[3], before[3]) and not torch.equal(after[7], before[7])
    # restarted codes sit on (normalised) encoder outputs: they are now picked by some latents' neighbourhoods
    flat = torch.nn.functional.normalize(latent.permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
    cos = flat @ torch.nn.functional.normalize(after[[3, 7]], dim=-1).t()
    assert cos.max(dim=0).values.min() > 0.99
    assert quantize.restart_dead_codes(latent, threshold=1.0) == 0


def test_restarts_go_where_the_codebook_fits_worst():
    quantize = VectorQuantizer(size=8, dim=4, l2_normalize=True, beta=0.25)
    with torch.no_grad():
        quantize.embedding.weight[:] = torch.eye(4).repeat(2, 1)
    quantize.usage[:6] = 5.0  # codes 6 and 7 are dead
    coded = torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(60, 1)  # fit exactly by code 0
    outlier = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), dim=-1)
    z = torch.cat([coded, outlier]).reshape(1, 61, 1, 4).permute(0, 3, 1, 2)
    assert quantize.restart_dead_codes(z, threshold=1.0) == 2
    cos = torch.nn.functional.normalize(quantize.embedding.weight[6:].detach(), dim=-1) @ outlier[0]
    assert (cos > 0.99).all()
