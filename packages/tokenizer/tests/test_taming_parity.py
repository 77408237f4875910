"""A taming-transformers VQModel state dict loads into our VQ-GAN and gives the same codes and
reconstructions as taming's own modules on the same (randomly initialised) weights.

Needs the `taming` test extra: pip install --no-deps taming-transformers-rom1504==0.0.6
"""

from __future__ import annotations

import pytest
import torch
import yaml

from mars_tokenizer import VQTokenizer, tokenizer_from_taming, tokenizer_from_taming_state_dict

try:
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer2
except ImportError:  # the suite runs without it; this file's tests then report why they skipped
    Encoder = None

pytestmark = pytest.mark.skipif(
    Encoder is None,
    reason="taming-transformers not installed: pip install --no-deps taming-transformers-rom1504==0.0.6",
)

# a small taming f4 config with every feature of the f16 one: attention at a resolution, channel
# changes (nin_shortcut), GroupNorm(32), mid attention
PARAMS = {
    "embed_dim": 16,
    "n_embed": 64,
    "ddconfig": {
        "double_z": False, "z_channels": 32, "resolution": 32, "in_channels": 3, "out_ch": 3,
        "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [16], "dropout": 0.0,
    },
}


class TamingVQModel(torch.nn.Module):
    """taming.models.vqgan.VQModel's autoencoder, built from taming's standalone modules (its
    VQModel class itself is Lightning-1 code), plus the training-only `loss.*` keys of a checkpoint."""

    def __init__(self):
        super().__init__()
        dd = PARAMS["ddconfig"]
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        self.quantize = VectorQuantizer2(PARAMS["n_embed"], PARAMS["embed_dim"], beta=0.25, sane_index_shape=True)
        self.quant_conv = torch.nn.Conv2d(dd["z_channels"], PARAMS["embed_dim"], 1)
        self.post_quant_conv = torch.nn.Conv2d(PARAMS["embed_dim"], dd["z_channels"], 1)
        self.loss = torch.nn.Module()
        self.loss.discriminator = torch.nn.Conv2d(3, 4, 3)

    def encode(self, x):
        quant, _, (_, _, codes) = self.quantize(self.quant_conv(self.encoder(x)))
        return quant, codes

    def decode_code(self, codes):
        z_q = self.quantize.get_codebook_entry(codes.flatten(), (*codes.shape, PARAMS["embed_dim"]))
        return self.decoder(self.post_quant_conv(z_q))


def make_taming_model() -> TamingVQModel:
    torch.manual_seed(0)
    model = TamingVQModel().eval()
    with torch.no_grad():  # spread the codebook so nearest codes are well separated
        model.quantize.embedding.weight.normal_()
        for m in model.modules():  # non-trivial GroupNorm affine parameters
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def check_parity(taming_model: TamingVQModel, ours) -> None:
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1  # non-square
    with torch.no_grad():
        quant, taming_codes = taming_model.encode(x)
        taming_rec = taming_model.decoder(taming_model.post_quant_conv(quant))
        codes = ours.encode(x)
        assert torch.equal(codes, taming_codes)
        assert codes.unique().numel() > 4  # a real test: many different codes are picked
        torch.testing.assert_close(ours.vqgan.decode_codes(codes), taming_rec, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.vqgan.decode_codes(codes), taming_model.decode_code(codes), rtol=1e-4, atol=1e-4)


def test_taming_state_dict_gives_taming_codes_and_reconstructions():
    taming_model = make_taming_model()
    ours = tokenizer_from_taming_state_dict(taming_model.state_dict(), PARAMS)
    assert ours.config.l2_normalize is False and ours.config.downsample == 4
    check_parity(taming_model, ours)


def test_taming_checkpoint_and_yaml_files_load(tmp_path):
    taming_model = make_taming_model()
    torch.save({"state_dict": taming_model.state_dict(), "global_step": 7}, tmp_path / "last.ckpt")
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel", "params": PARAMS}}))
    check_parity(taming_model, tokenizer_from_taming(tmp_path / "last.ckpt", tmp_path / "model.yaml"))
    # once imported, it is an ordinary tokenizer directory
    tokenizer_from_taming(tmp_path / "last.ckpt", tmp_path / "model.yaml").save_pretrained(tmp_path / "tok")
    check_parity(taming_model, VQTokenizer.from_pretrained(tmp_path / "tok"))


def test_mismatched_state_dict_is_rejected():
    state = make_taming_model().state_dict()
    del state["quant_conv.bias"]
    with pytest.raises(ValueError, match="missing"):
        tokenizer_from_taming_state_dict(state, PARAMS)
