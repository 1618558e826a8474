"""Each primitive and each layer against the PyTorch module it mirrors, on random inputs.

Tolerance: relative error = max|ours - torch| / max|torch|. Both sides compute in float32 (about
7 significant digits); a layer does a few hundred multiply-adds per output, so rounding alone
stays near 1e-6. 1e-5 leaves room for that and still fails on any real mistake (a wrong eps, a
missing bias or a transposed weight gives errors of 1e-3 and more).
"""

import math

import numpy as np
import pytest
import torch
from tiny import tiny_config
from torch import nn
from transformers.models.blip_2 import modeling_blip_2 as ref
from transformers.models.opt import modeling_opt as ref_opt

from miniblip2 import nn as mnn
from miniblip2.blip2 import config_from_dict
from miniblip2.opt import causal_mask, opt_layer, position_ids
from miniblip2.qformer import qformer_layer
from miniblip2.vision import bicubic_matrix, interpolate_positions, patch_embed, vit_layer

TOL = 1e-5


def rel_error(ours, theirs):
    theirs = theirs.detach().double().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs, float)
    return np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max()


def module_weights(module):
    """A torch module's parameters as the nested dict miniblip2 reads (keys split on '.')."""
    from miniblip2.checkpoint.safetensors import nest
    return nest({k: v.detach().numpy() for k, v in module.state_dict().items()})


def randomise(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return module.eval()


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def config():
    hf = tiny_config()
    hf.vision_config._attn_implementation = "eager"
    hf.qformer_config._attn_implementation = "eager"
    hf.text_config._attn_implementation = "eager"
    return hf, config_from_dict(hf.to_dict())


def test_linear_matches_torch():
    layer = randomise(nn.Linear(13, 7))
    x = randn(2, 5, 13)
    assert rel_error(mnn.linear(x.numpy(), module_weights(layer)), layer(x)) < TOL


@pytest.mark.parametrize("eps", [1e-12, 1e-6, 1e-5])
def test_layer_norm_matches_torch(eps):
    norm = randomise(nn.LayerNorm(11, eps=eps))
    x = 3 + 2 * randn(4, 11)  # an offset and a scale so that mean and variance both matter
    assert rel_error(mnn.layer_norm(x.numpy(), module_weights(norm), eps), norm(x)) < TOL


@pytest.mark.parametrize("name", sorted(mnn.ACTIVATIONS))
def test_activations_match_transformers(name):
    from transformers.activations import ACT2FN
    x = torch.linspace(-12, 12, 4001)
    ours, theirs = mnn.ACTIVATIONS[name](x.numpy()), ACT2FN[name](x)
    # Absolute error too: relative error over the whole range would hide a bad negative tail.
    assert rel_error(ours, theirs) < TOL
    assert np.abs(ours - theirs.numpy()).max() < 1e-6


def test_gelu_negative_tail_keeps_relative_precision():
    # Where gelu(x) is tiny (x < -4) a plain 1 + erf(x) loses every digit (torch's own gelu
    # returns 0 there); erfc keeps them. Reference: Python's correctly rounded math.erfc.
    x = np.linspace(-9, -4, 101).astype(np.float32)
    exact = np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in x.astype(float)])
    assert np.max(np.abs(mnn.gelu(x) - exact) / np.abs(exact)) < 1e-5


def test_softmax_matches_torch_with_large_logits():
    x = 80 * randn(3, 50)  # large enough that exp overflows without the max subtracted
    assert rel_error(mnn.softmax(x.numpy()), torch.softmax(x, -1)) < TOL


def test_patch_embedding_matches_conv2d():
    conv = randomise(nn.Conv2d(3, 10, kernel_size=6, stride=6))
    x = randn(2, 3, 32, 25)  # not multiples of 6: the conv drops the border pixels
    ours = patch_embed(x.numpy(), module_weights(conv), 6)
    theirs = conv(x).flatten(2).transpose(1, 2)
    assert ours.shape == tuple(theirs.shape) == (2, 20, 10)
    assert rel_error(ours, theirs) < TOL


@pytest.mark.parametrize("n_in,n_out", [(5, 7), (5, 3), (16, 35), (4, 4)])
def test_bicubic_matrix_matches_torch_interpolate(n_in, n_out):
    grid = randn(1, 1, n_in, n_in)
    theirs = nn.functional.interpolate(grid, size=(n_out, n_out), mode="bicubic", align_corners=False)
    m = bicubic_matrix(n_in, n_out)
    assert rel_error(m @ grid[0, 0].double().numpy() @ m.T, theirs[0, 0]) < TOL


def test_interpolate_positions_matches_blip2_embeddings(config):
    hf, _ = config
    embeddings = randomise(ref.Blip2VisionEmbeddings(hf.vision_config))
    w = module_weights(embeddings)
    tokens = torch.zeros(1, 1 + 8 * 6, 40)  # only its shape is read: 8 x 6 patches from a 5 x 5 grid
    with torch.no_grad():
        theirs = embeddings.interpolate_pos_encoding(tokens, height=48, width=36)
    ours = interpolate_positions(w["position_embedding"], 8, 6)
    assert ours.shape == (1, 49, 40)
    assert rel_error(ours, theirs) < TOL


def test_vit_layer_matches_blip2_encoder_layer(config):
    hf, ours_config = config
    layer = randomise(ref.Blip2EncoderLayer(hf.vision_config))
    x = randn(2, 26, 40)
    with torch.no_grad():
        theirs = layer(x)
    assert rel_error(vit_layer(x.numpy(), module_weights(layer), ours_config.vision), theirs) < TOL


@pytest.mark.parametrize("layer_index", [0, 1])  # with and without cross-attention
def test_qformer_layer_matches_blip2_qformer_layer(config, layer_index):
    hf, ours_config = config
    hf.qformer_config.encoder_hidden_size = 40
    layer = randomise(ref.Blip2QFormerLayer(hf.qformer_config, layer_index))
    queries, image = randn(2, 5, 24), randn(2, 26, 40, seed=2)
    with torch.no_grad():
        theirs = layer(queries, None, image, query_length=5)
    w = module_weights(layer)
    assert ("crossattention" in w) == (layer_index == 0)
    assert rel_error(qformer_layer(queries.numpy(), image.numpy(), w, ours_config.qformer), theirs) < TOL


def test_opt_layer_matches_opt_decoder_layer_with_padding(config):
    hf, ours_config = config
    layer = randomise(ref_opt.OPTDecoderLayer(hf.text_config, layer_idx=0))
    x = randn(2, 7, 36)
    mask = np.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])  # the second row is left-padded
    additive = causal_mask(mask, 0, np.float32)
    with torch.no_grad():
        theirs = layer(x, attention_mask=torch.from_numpy(additive))
    ours = opt_layer(x.numpy(), module_weights(layer), ours_config.text, additive)
    real = mask == 1  # padded rows attend to nothing real; only real rows are defined
    assert rel_error(ours[real], theirs[torch.from_numpy(real)]) < TOL


def test_opt_positions_skip_left_padding():
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
    assert position_ids(mask, 0).tolist() == [[2, 3, 4, 5], [1, 1, 2, 3]]  # offset 2; padding -> row 1
    assert position_ids(np.concatenate([mask, [[1], [1]]], 1), 4).tolist() == [[6], [4]]
